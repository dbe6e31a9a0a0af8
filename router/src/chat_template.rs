//! Chat templates: the model's Jinja template rendered with minijinja, with the Python
//! compatibility Hugging Face templates rely on (`.strip()` and friends, `raise_exception`,
//! `strftime_now`, loop controls, `tojson`).

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

/// Why a template could not produce a prompt. `Display` is the text after "Template error: ".
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateError {
    #[error("template not found")]
    NotFound,
    #[error("{0}")]
    Render(String),
}

/// One message as the template sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's calls, in OpenAI's shape (`function.arguments` a JSON string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

#[derive(Serialize)]
struct Context<'a> {
    messages: &'a [TemplateMessage],
    bos_token: Option<&'a str>,
    eos_token: Option<&'a str>,
    add_generation_prompt: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a [serde_json::Value]>,
}

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The template renders a `tools` variable (Hugging Face's convention for tool use).
    knows_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// Most steps (minijinja's fuel) one rendering may take.
const TEMPLATE_FUEL: u64 = 50_000_000;

impl ChatTemplate {
    /// Compiles `source` (after TGI's rewrites of Python-only syntax).
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let knows_tools = source.contains("tools");
        let source = source
            .replace("[::-1]", "|reverse")
            .replace("{% generation %}", "")
            .replace("{% endgeneration %}", "")
            .replace("{%- generation %}", "")
            .replace("{%- endgeneration %}", "");
        let mut env = Environment::new();
        // A template that loops without end (or nearly) fails instead of holding a
        // validation worker: real templates take well under a million steps even for
        // thousands of messages.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| TemplateError::Render(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
            knows_tools,
        })
    }

    /// Whether the template shows the model a `tools` list itself.
    pub fn knows_tools(&self) -> bool {
        self.knows_tools
    }

    /// Renders the prompt with `add_generation_prompt=true`. When the last message is the
    /// assistant's, the text is cut right after its content so the model continues it.
    pub fn apply(&self, messages: &[TemplateMessage]) -> Result<String, TemplateError> {
        self.apply_with_tools(messages, None)
    }

    /// [`ChatTemplate::apply`] with the request's tools as the template's `tools`.
    pub fn apply_with_tools(
        &self,
        messages: &[TemplateMessage],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render(e.to_string()))?;
        let rendered = template
            .render(minijinja::value::Serde(Context {
                messages,
                bos_token: self.bos_token.as_deref(),
                eos_token: self.eos_token.as_deref(),
                add_generation_prompt: true,
                tools,
            }))
            .map_err(|e| TemplateError::Render(render_error_text(&e)))?;
        match messages.last() {
            Some(last) if last.role == "assistant" && !last.content.is_empty() => {
                match rendered.rfind(last.content.as_str()) {
                    Some(at) => Ok(rendered[..at + last.content.len()].trim_end().to_string()),
                    None => Ok(rendered),
                }
            }
            _ => Ok(rendered),
        }
    }
}

/// A template's own `raise_exception("...")` message is the useful part; show it alone.
fn render_error_text(e: &minijinja::Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        _ => e.to_string(),
    }
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> Result<Value, minijinja::Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Value::from(strftime_utc(&format, now)))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// `strftime` for a UTC unix time, for the directives chat templates use
/// (`%Y %y %m %d %e %B %b %A %a %H %M %S %j %%`); others are left as written.
fn strftime_utc(format: &str, unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = ((days % 7 + 7 + 3) % 7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{:02}", secs_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs_of_day % 60)),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Howard Hinnant's days-to-civil conversion (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> TemplateMessage {
        TemplateMessage {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }

    /// The shape of SmolLM2-Instruct's template: a default system prompt when none is given,
    /// ChatML turns, loop.first, and the generation prompt.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template() {
        let t = ChatTemplate::new(SMOLLM2, None, Some("<|im_end|>".into())).unwrap();
        let out = t.apply(&[msg("user", "Hi")]).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .apply(&[msg("system", "Be brief."), msg("user", "Hi")])
            .unwrap();
        assert!(out.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"));
    }

    #[test]
    fn python_methods_tokens_and_tojson() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m.role.upper() }}:{{ m.content.strip() }}|{% endfor %}{{ messages[0] | tojson }}";
        let t = ChatTemplate::new(src, Some("<s>".into()), None).unwrap();
        let out = t.apply(&[msg("user", "  hi  ")]).unwrap();
        assert_eq!(
            out,
            "<s>USER:hi|{\"role\": \"user\", \"content\": \"  hi  \"}"
        );
    }

    #[test]
    fn loop_controls_and_reverse_rewrite() {
        let src = "{% for m in messages[::-1] %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}{% break %}{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(
            t.apply(&[msg("user", "a"), msg("user", "b"), msg("system", "s")])
                .unwrap(),
            "b"
        );
    }

    #[test]
    fn raise_exception_becomes_a_template_error_with_its_message() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.apply(&[msg("user", "x")]).unwrap(), "ok");
        let e = t.apply(&[msg("assistant", "x")]).unwrap_err();
        assert_eq!(
            e,
            TemplateError::Render("Conversation must start with user".into())
        );
    }

    #[test]
    fn syntax_errors_are_template_errors() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", None, None),
            Err(TemplateError::Render(_))
        ));
    }

    #[test]
    fn final_assistant_message_is_continued() {
        let src = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(
            t.apply(&[msg("user", "q"), msg("assistant", "The answer is")])
                .unwrap(),
            "<user>q</s>\n<assistant>The answer is"
        );
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(
            strftime_utc("%d %b %Y %H:%M:%S %A %j %y %%", t),
            "29 Feb 2024 13:05:09 Thursday 060 24 %"
        );
        assert_eq!(strftime_utc("%B %e", 0), "January  1");
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).unwrap();
        assert!(t.apply(&[]).unwrap().parse::<u32>().unwrap() >= 2024);
    }
}
