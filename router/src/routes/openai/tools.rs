//! OpenAI tool calling: the request's `tools` and `tool_choice` become a grammar the shard
//! enforces (so a call the model makes always parses), the prompt tells the model the tools
//! (through the chat template when it knows `tools`, else in a system message), and the
//! generated text is read back as `tool_calls`, whole or as streamed deltas.
//!
//! A call is written as Hermes/Qwen-style models are trained to write it:
//! `<tool_call>\n{"name": "fn", "arguments": {...}}\n</tool_call>`, one block per call, calls
//! separated by a newline. With `auto` the output is either such calls or text that does not
//! start with `<tool_call>`; with `required` or a named function it is calls only.

use serde_json::{json, Value};

use crate::error::ApiError;
use crate::types::{ToolCall, ToolCallDelta, ToolFunction, ToolFunctionDelta};

pub(super) const OPEN: &str = "<tool_call>";
pub(super) const CLOSE: &str = "</tool_call>";

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of the arguments (an object schema).
    pub parameters: Value,
}

/// What the model may or must do with the tools.
#[derive(Debug, Clone, PartialEq)]
enum Choice {
    Auto,
    Required,
    Named(String),
}

/// Tool calling for one request.
#[derive(Debug, Clone)]
pub(crate) struct ToolCalling {
    tools: Vec<Tool>,
    choice: Choice,
    parallel: bool,
}

fn tool_error(message: impl Into<String>) -> ApiError {
    ApiError::Tool(message.into())
}

impl ToolCalling {
    /// `None` when the request uses no tools (none given, an empty list, or `tool_choice:
    /// "none"`).
    pub(crate) fn from_request(
        tools: Option<&[Value]>,
        tool_choice: Option<&Value>,
        parallel_tool_calls: Option<bool>,
    ) -> Result<Option<Self>, ApiError> {
        let tools = tools.unwrap_or_default();
        let choice = match tool_choice {
            None => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => return Ok(None),
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                // TGI takes a bare function name.
                name => Choice::Named(name.to_string()),
            },
            Some(choice @ Value::Object(o)) => {
                function_type(choice)?;
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| tool_error("`tool_choice` names no function"))?;
                Choice::Named(name.to_string())
            }
            Some(_) => return Err(tool_error("`tool_choice` must be a string or an object")),
        };
        if tools.is_empty() {
            return match choice {
                Choice::Auto => Ok(None),
                _ => Err(tool_error("`tool_choice` needs `tools`")),
            };
        }
        let tools = tools
            .iter()
            .map(parse_tool)
            .collect::<Result<Vec<_>, _>>()?;
        if let Choice::Named(name) = &choice {
            if !tools.iter().any(|t| &t.name == name) {
                return Err(tool_error(format!("Tool with name {name} not found")));
            }
        }
        Ok(Some(Self {
            tools,
            choice,
            parallel: parallel_tool_calls.unwrap_or(true),
        }))
    }

    /// The tools as the chat template's `tools` variable (OpenAI's shape).
    pub(crate) fn template_tools(&self) -> Vec<Value> {
        self.tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.parameters,
                }})
            })
            .collect()
    }

    /// For a template that does not know `tools`: a system message that shows them and the
    /// format of a call.
    pub(crate) fn system_prompt(&self) -> String {
        let mut s = String::from(
            "You can call functions to answer. The functions, one JSON signature per line:\n<tools>\n",
        );
        for t in self.template_tools() {
            s.push_str(&t.to_string());
            s.push('\n');
        }
        s.push_str("</tools>\nTo call a function, answer with one block per call:\n");
        s.push_str(OPEN);
        s.push_str("\n{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}\n");
        s.push_str(CLOSE);
        if self.choice == Choice::Auto {
            s.push_str("\nOtherwise answer in plain text.");
        }
        s
    }

    /// The grammar, as `parameters.grammar` takes it.
    pub(crate) fn grammar(&self) -> Value {
        let allowed: Vec<&Tool> = match &self.choice {
            Choice::Named(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
            _ => self.tools.iter().collect(),
        };
        let calls: Vec<Value> = allowed
            .iter()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = json!({
            "anyOf": calls,
            "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
        });
        let repeat = if self.parallel { "(\"\\n\" call)*" } else { "" };
        let start = match self.choice {
            Choice::Auto => "start: calls | TEXT",
            _ => "start: calls",
        };
        let lark = format!(
            "{start}\ncalls: call {repeat}\ncall: {open:?} \"\\n\" %json {schema} \"\\n\" {close:?}\n\
             TEXT: /(?s:.+)/ & ~/(?s:{open}.*)/\n",
            open = OPEN,
            close = CLOSE,
        );
        json!({"type": "lark", "value": lark})
    }
}

/// A tool's or a named `tool_choice`'s `type`: `function`, or absent.
fn function_type(v: &Value) -> Result<(), ApiError> {
    match v.get("type") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(t)) if t == "function" => Ok(()),
        Some(Value::String(t)) => Err(tool_error(format!("tools of type {t} are not supported"))),
        Some(_) => Err(tool_error("a tool's `type` must be a string")),
    }
}

/// `{"type": "function", "function": {"name", "description"?, "parameters"?}}`.
fn parse_tool(v: &Value) -> Result<Tool, ApiError> {
    function_type(v)?;
    let f = v
        .get("function")
        .ok_or_else(|| tool_error("a tool has no `function`"))?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| tool_error("a function has no `name`"))?;
    let mut parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(tool_error(format!(
                "`{name}`: `parameters` must be an object"
            )))
        }
    };
    // As OpenAI's strict mode: arguments the function does not declare are not generated
    // unless its schema says they may be.
    if let Value::Object(p) = &mut parameters {
        p.entry("additionalProperties")
            .or_insert(Value::Bool(false));
    }
    let description = match f.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(tool_error(format!(
                "`{name}`: `description` must be a string"
            )))
        }
    };
    Ok(Tool {
        name: name.to_string(),
        description,
        parameters,
    })
}

/// The whole calls in a generated text, when it is calls (`None`: it is plain content, or its
/// first call was cut short by the token limit). Calls after a cut one are dropped.
pub(crate) fn parse_calls(text: &str, id_prefix: &str) -> Option<Vec<ToolCall>> {
    let mut rest = text.trim_start();
    if !rest.starts_with(OPEN) {
        return None;
    }
    let mut calls = Vec::new();
    while let Some(after) = rest.strip_prefix(OPEN) {
        let Some(end) = after.find(CLOSE) else {
            break;
        };
        let Ok(call) = serde_json::from_str::<Value>(after[..end].trim()) else {
            break;
        };
        let Some(name) = call.get("name").and_then(Value::as_str).map(str::to_string) else {
            break;
        };
        let arguments = call.get("arguments").cloned().unwrap_or(json!({}));
        calls.push(ToolCall {
            id: format!("{id_prefix}{}", calls.len()),
            kind: "function".into(),
            function: ToolFunction {
                name,
                arguments: arguments.to_string(),
            },
        });
        rest = after[end + CLOSE.len()..].trim_start();
    }
    (!calls.is_empty()).then_some(calls)
}

/// Reads a streamed generation as content or as tool calls, piece by piece.
#[derive(Debug)]
pub(crate) struct CallStream {
    id_prefix: String,
    /// Text not yet given out.
    pending: String,
    mode: Mode,
    calls: usize,
}

#[derive(Debug, PartialEq)]
enum Mode {
    /// Too little text to tell content from a call.
    Undecided,
    Content,
    /// Between calls: waiting for the next call's name.
    Header,
    /// Inside a call's arguments: JSON nesting depth and string state.
    Arguments {
        depth: usize,
        in_string: bool,
        escaped: bool,
    },
    /// After a call's arguments, until its closing tag.
    Trailer,
}

/// What a piece of generated text turns into.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Delta {
    pub content: String,
    pub tool_calls: Vec<ToolCallDelta>,
}

impl CallStream {
    pub(crate) fn new(id_prefix: String) -> Self {
        Self {
            id_prefix,
            pending: String::new(),
            mode: Mode::Undecided,
            calls: 0,
        }
    }

    /// Whether any call was given out (the finish reason is then `tool_calls`).
    pub(crate) fn made_calls(&self) -> bool {
        self.calls > 0
    }

    /// Takes the next piece of generated text.
    pub(crate) fn push(&mut self, piece: &str) -> Delta {
        self.pending.push_str(piece);
        let mut delta = Delta::default();
        loop {
            match &mut self.mode {
                Mode::Undecided => {
                    let trimmed = self.pending.trim_start();
                    if trimmed.starts_with(OPEN) {
                        self.mode = Mode::Header;
                    } else if !trimmed.is_empty() && !OPEN.starts_with(trimmed) {
                        self.mode = Mode::Content;
                    } else {
                        return delta;
                    }
                }
                Mode::Content => {
                    delta.content.push_str(&std::mem::take(&mut self.pending));
                    return delta;
                }
                Mode::Header => {
                    // `<tool_call>\n{"name": "fn", "arguments": ` (the grammar's layout).
                    let Some(start) = self.pending.find(OPEN) else {
                        return delta;
                    };
                    let head = &self.pending[start + OPEN.len()..];
                    let Some(args_at) = head.find("\"arguments\": ") else {
                        return delta;
                    };
                    let Some(name) = header_name(&head[..args_at]) else {
                        return delta;
                    };
                    let consumed = start + OPEN.len() + args_at + "\"arguments\": ".len();
                    delta.tool_calls.push(ToolCallDelta {
                        index: self.calls as u32,
                        id: Some(format!("{}{}", self.id_prefix, self.calls)),
                        kind: Some("function".into()),
                        function: ToolFunctionDelta {
                            name: Some(name),
                            arguments: String::new(),
                        },
                    });
                    self.calls += 1;
                    self.pending.drain(..consumed);
                    self.mode = Mode::Arguments {
                        depth: 0,
                        in_string: false,
                        escaped: false,
                    };
                }
                Mode::Arguments {
                    depth,
                    in_string,
                    escaped,
                } => {
                    let mut end = None;
                    for (i, c) in self.pending.char_indices() {
                        if *in_string {
                            match (c, *escaped) {
                                (_, true) => *escaped = false,
                                ('\\', false) => *escaped = true,
                                ('"', false) => *in_string = false,
                                _ => {}
                            }
                            continue;
                        }
                        match c {
                            '"' => *in_string = true,
                            '{' | '[' => *depth += 1,
                            '}' | ']' => {
                                *depth = depth.saturating_sub(1);
                                if *depth == 0 {
                                    end = Some(i + c.len_utf8());
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    let upto = end.unwrap_or(self.pending.len());
                    let fragment: String = self.pending.drain(..upto).collect();
                    if !fragment.is_empty() {
                        delta.tool_calls.push(ToolCallDelta {
                            index: self.calls as u32 - 1,
                            id: None,
                            kind: None,
                            function: ToolFunctionDelta {
                                name: None,
                                arguments: fragment,
                            },
                        });
                    }
                    if end.is_none() {
                        return merge(delta);
                    }
                    self.mode = Mode::Trailer;
                }
                Mode::Trailer => {
                    let Some(at) = self.pending.find(CLOSE) else {
                        return merge(delta);
                    };
                    self.pending.drain(..at + CLOSE.len());
                    self.mode = Mode::Header;
                }
            }
        }
    }

    /// The end of the generation: text still held back (a short answer that looked like the
    /// start of a call) is content.
    pub(crate) fn finish(&mut self) -> String {
        match self.mode {
            Mode::Undecided | Mode::Content => std::mem::take(&mut self.pending),
            _ => String::new(),
        }
    }
}

/// `{"name": "fn", ` → `fn`.
fn header_name(head: &str) -> Option<String> {
    let object = head.trim_start().strip_prefix('{')?;
    let object = format!("{{{}\"arguments\": 0}}", object);
    let v: Value = serde_json::from_str(&object).ok()?;
    v.get("name")?.as_str().map(str::to_string)
}

/// One delta per call: consecutive argument fragments of the same call joined.
fn merge(delta: Delta) -> Delta {
    let mut calls: Vec<ToolCallDelta> = Vec::with_capacity(delta.tool_calls.len());
    for c in delta.tool_calls {
        match calls.last_mut() {
            Some(last) if last.index == c.index && c.id.is_none() => {
                last.function.arguments.push_str(&c.function.arguments);
            }
            _ => calls.push(c),
        }
    }
    Delta {
        content: delta.content,
        tool_calls: calls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]}}})
    }

    #[test]
    fn choices_parse_and_unknown_names_are_refused() {
        let tools = [weather()];
        let none = ToolCalling::from_request(Some(&tools), Some(&json!("none")), None).unwrap();
        assert!(none.is_none());
        assert!(ToolCalling::from_request(None, None, None)
            .unwrap()
            .is_none());
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let t = ToolCalling::from_request(Some(&tools), Some(&named), Some(false))
            .unwrap()
            .unwrap();
        assert_eq!(t.choice, Choice::Named("get_weather".into()));
        assert!(!t.parallel);
        let missing = json!({"type": "function", "function": {"name": "nope"}});
        let e = ToolCalling::from_request(Some(&tools), Some(&missing), None).unwrap_err();
        assert_eq!(e.to_string(), "Tool error: Tool with name nope not found");
        assert!(
            ToolCalling::from_request(Some(&[json!({"type": "function"})]), None, None).is_err()
        );
    }

    #[test]
    fn calls_parse_from_the_grammar_layout() {
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"R}o\\\"me\"}}\n</tool_call>";
        let calls = parse_calls(text, "call_").unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, r#"{"city":"Paris"}"#);
        assert_eq!(calls[1].id, "call_1");
        assert!(parse_calls("Hello", "c").is_none());
        assert!(parse_calls("<tool_call>\n{\"name\": \"get_wea", "c").is_none());
        let cut = &text[..text.len() - 20];
        assert_eq!(parse_calls(cut, "call_").unwrap(), calls[..1]);

        // Streamed in small pieces: the same calls, as OpenAI's deltas.
        for size in [1, 3, 7, 1000] {
            let mut stream = CallStream::new("call_".into());
            let mut names = Vec::new();
            let mut args: Vec<String> = Vec::new();
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(size) {
                let delta = stream.push(&piece.iter().collect::<String>());
                assert_eq!(delta.content, "");
                for c in delta.tool_calls {
                    if let Some(name) = c.function.name {
                        assert_eq!(c.id, Some(format!("call_{}", names.len())));
                        names.push(name);
                        args.push(String::new());
                    }
                    args[c.index as usize].push_str(&c.function.arguments);
                }
            }
            assert_eq!(stream.finish(), "");
            assert!(stream.made_calls());
            assert_eq!(names, ["get_weather", "get_weather"], "size {size}");
            assert_eq!(
                args,
                [r#"{"city": "Paris"}"#, r#"{"city": "R}o\"me"}"#],
                "size {size}"
            );
        }
    }

    #[test]
    fn content_streams_as_content() {
        let mut stream = CallStream::new("c".into());
        assert_eq!(stream.push("<to").content, "");
        assert_eq!(stream.push("day").content, "<today");
        assert_eq!(stream.push(" is sunny").content, " is sunny");
        assert!(!stream.made_calls());
        let mut short = CallStream::new("c".into());
        assert_eq!(short.push(" <").content, "");
        assert_eq!(short.finish(), " <");
    }
}
