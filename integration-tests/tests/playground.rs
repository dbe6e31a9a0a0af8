//! `/playground` in a real browser: headless Chromium (Debian's `chromium`; `.ci/run` installs
//! it) opens the page on a tiny model with a message to send, the page streams the answer in,
//! and the DOM it leaves shows the conversation, the model's info, and an answer assembled from
//! several streamed chunks that is the same text as the non-streamed greedy answer. A screenshot
//! is kept in `target/tmp/playground.png`. The browser is driven over the DevTools protocol
//! (on a pipe, no extra crate): wait for the page to say it is done, read the DOM, screenshot.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Wick;
use serde_json::{json, Value};

fn chromium() -> PathBuf {
    let names = ["chromium", "chromium-browser", "google-chrome"];
    std::env::var_os("WICK_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
                .find(|p| p.is_file())
        })
        .expect("no Chromium: install Debian's `chromium` (.ci/run does) or set WICK_CHROMIUM")
}

/// Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
/// JSON messages ended by NUL, commands on the child's fd 3, answers on its fd 4).
struct Browser {
    child: std::process::Child,
    commands: std::fs::File,
    answers: std::io::BufReader<std::fs::File>,
    next_id: u64,
    session: Option<String>,
}

impl Browser {
    fn start() -> Self {
        use std::os::fd::FromRawFd;
        use std::os::unix::process::CommandExt;
        let pipe = || {
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors pipe2(2) writes. Close-on-exec:
            // no other child inherits them; the browser gets its two as fds 3 and 4 below.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            (fds[0], fds[1])
        };
        let (child_reads, we_write) = pipe();
        let (we_read, child_writes) = pipe();
        let profile = tempfile::tempdir().unwrap().keep();
        let mut command = Command::new(chromium());
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .args(["--remote-debugging-pipe", "--window-size=1280,800"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec. Both ends move above 9
        // first, so placing one at 3 or 4 cannot close the other; dup2 clears close-on-exec.
        unsafe {
            command.pre_exec(move || {
                let reads = libc::fcntl(child_reads, libc::F_DUPFD, 10);
                let writes = libc::fcntl(child_writes, libc::F_DUPFD, 10);
                if reads < 0 || writes < 0 || libc::dup2(reads, 3) < 0 || libc::dup2(writes, 4) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("starting chromium");
        // SAFETY: the child's ends, which this process no longer uses.
        unsafe {
            libc::close(child_reads);
            libc::close(child_writes);
        }
        // SAFETY: both descriptors are ours alone from here on.
        let commands = unsafe { std::fs::File::from_raw_fd(we_write) };
        let answers = unsafe { std::fs::File::from_raw_fd(we_read) };
        Browser {
            child,
            commands,
            answers: std::io::BufReader::new(answers),
            next_id: 0,
            session: None,
        }
    }

    /// Sends one command and returns its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        use std::io::{BufRead, Write};
        self.next_id += 1;
        let mut message = json!({"id": self.next_id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .expect("writing to chromium");
        loop {
            let mut buffer = Vec::new();
            let n = self
                .answers
                .read_until(0, &mut buffer)
                .expect("reading chromium");
            assert!(n > 0, "chromium closed its pipe during {method}");
            buffer.pop();
            let answer: Value = serde_json::from_slice(&buffer).unwrap();
            if answer["id"] == self.next_id {
                assert!(answer["error"].is_null(), "{method}: {answer}");
                return answer["result"].clone();
            }
        }
    }

    /// Opens `url` in a new page and talks to that page from now on.
    fn open(&mut self, url: &str) {
        let target = self.call("Target.createTarget", json!({"url": url}));
        let attached = self.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        self.session = attached["sessionId"].as_str().map(str::to_string);
    }

    fn eval(&mut self, expression: &str) -> Value {
        let out = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        out["result"]["value"].clone()
    }

    fn screenshot(&mut self) -> Vec<u8> {
        let out = self.call("Page.captureScreenshot", json!({"format": "png"}));
        base64_decode(out["data"].as_str().expect("screenshot data"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text content of the first element whose opening tag contains `marker`.
fn element_text<'a>(dom: &'a str, marker: &str) -> Option<(&'a str, &'a str)> {
    let start = dom.find(marker)?;
    let tag_end = start + dom[start..].find('>')?;
    let text_end = tag_end + dom[tag_end..].find('<')?;
    Some((&dom[start..tag_end], &dom[tag_end + 1..text_end]))
}

fn unescape(html: &str) -> String {
    html.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|q| {
            let n = q.iter().fold(0u32, |acc, &d| acc << 6 | d as u32) << (6 * (4 - q.len()));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes.into_iter().take(q.len().saturating_sub(1))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_streams_an_answer_in_a_browser() {
    let mut wick = Wick::start_tiny(&[]);
    wick.wait_healthy().await;
    let page = wick.url("/playground?message=Hello%20there&temperature=0&max_tokens=12&send=1");

    let (dom, png) = tokio::task::spawn_blocking(move || {
        let mut browser = Browser::start();
        browser.open(&page);
        // The page marks its state on <body>: streaming, then done (or error).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let state = browser.eval("document.body && document.body.dataset.state");
            if state == "done" || state == "error" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the page is still {state}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let dom = browser.eval("document.documentElement.outerHTML");
        (
            dom.as_str().unwrap_or_default().to_string(),
            browser.screenshot(),
        )
    })
    .await
    .unwrap();
    assert!(
        dom.contains(r#"<body data-state="done">"#),
        "the page did not finish:\n{dom}"
    );
    let (_, user) = element_text(&dom, r#"class="msg user""#).expect("the user's message");
    assert_eq!(user, "Hello there");
    let (tag, answer) = element_text(&dom, r#"class="msg assistant""#).expect("an answer");
    let chunks: usize = tag
        .split("data-chunks=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .expect("the answer's chunk count");
    assert!(chunks >= 2, "one chunk only: {tag}");
    let (_, info) = element_text(&dom, r#"id="info""#).expect("the model info");
    assert!(info.contains(" tokens · 1 shard(s)"), "{info}");

    // The page's text is the streamed tokens put together: the greedy answer, as a client
    // without a browser gets it.
    let reference: Value = reqwest::Client::new()
        .post(wick.url("/v1/chat/completions"))
        .json(
            &json!({"model": "m", "temperature": 0, "max_tokens": 12, "top_p": 1,
            "frequency_penalty": 0, "presence_penalty": 0,
            "messages": [{"role": "user", "content": "Hello there"}]}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let expected = reference["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert_eq!(unescape(answer), expected);

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("playground.png");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "not a screenshot"
    );
    std::fs::write(&shot, png).unwrap();
    println!("screenshot: {}", shot.display());
}
