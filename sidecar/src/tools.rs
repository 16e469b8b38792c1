//! Tool calling for models whose chat template has no tool syntax of its own (llama.cpp's
//! template engine renders roles and text only), done the way llama-server's "generic" tool
//! format does it:
//!
//! * the tools are described to the model in a system message ([`Plan::instructions`]);
//! * a grammar built from the tool schemas ([`Plan::grammar`]) makes the model answer with JSON
//!   only: `{"tool_calls":[{"name":…,"arguments":{…}}]}` to call tools, or `{"response":"…"}` to
//!   answer in text (`tool_choice: auto`). `required` and a named function allow only the first
//!   form (the named one: only that function); `parallel_tool_calls: false` allows one call;
//!   `none` constrains nothing and describes no tools;
//! * [`CallParser`] reads that JSON as it is generated, so a stream carries the answer's text as
//!   `content` deltas and each call's arguments as `tool_calls` deltas, as they are generated;
//! * on the next turn, an assistant message's `tool_calls` are written back in the same JSON
//!   form, and `tool` messages become `tool` turns of the template, so the conversation reads to
//!   the model as it was produced.

use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Most tools one request may declare (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

#[derive(Debug, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub function: Option<FunctionDef>,
}

#[derive(Debug, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
}

/// `tool_choice`: `"none" | "auto" | "required"` or `{"type":"function","function":{"name":…}}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(String),
    Named {
        #[serde(rename = "type")]
        kind: String,
        function: NamedFunction,
    },
}

#[derive(Debug, Deserialize)]
pub struct NamedFunction {
    pub name: String,
}

/// A tool call in an assistant message of the conversation so far.
#[derive(Debug, Deserialize)]
pub struct PastCall {
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: PastFunction,
}

#[derive(Debug, Deserialize)]
pub struct PastFunction {
    pub name: String,
    /// A JSON text, as OpenAI sends it.
    pub arguments: String,
}

/// What a request's tools turn into: text for the system message and the grammar that holds
/// the model to the call format.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub instructions: String,
    pub grammar: String,
}

fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::InvalidField {
        param: param.into(),
        message: message.into(),
    }
}

/// OpenAI's rule for function names.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Validates `tools`, `tool_choice` and `parallel_tool_calls` and builds the plan; `None` when
/// there are no tools or `tool_choice` is `none`.
pub fn plan(
    tools: Option<&[Tool]>,
    choice: Option<&ToolChoice>,
    parallel: bool,
) -> Result<Option<Plan>, ApiError> {
    let tools = tools.unwrap_or_default();
    if tools.len() > MAX_TOOLS {
        return Err(invalid(
            "tools",
            format!("at most {MAX_TOOLS} tools may be given"),
        ));
    }
    let mut functions: Vec<&FunctionDef> = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        if tool.kind != "function" {
            return Err(invalid(
                format!("tools[{i}].type"),
                format!(
                    "tool type {:?} is not supported; use \"function\"",
                    tool.kind
                ),
            ));
        }
        let f = tool.function.as_ref().ok_or_else(|| {
            invalid(
                format!("tools[{i}].function"),
                "a function tool needs `function`",
            )
        })?;
        if !valid_name(&f.name) {
            return Err(invalid(
                format!("tools[{i}].function.name"),
                format!(
                    "function name {:?} must be 1 to 64 letters, digits, underscores or dashes",
                    f.name
                ),
            ));
        }
        if functions.iter().any(|g| g.name == f.name) {
            return Err(invalid(
                format!("tools[{i}].function.name"),
                format!("function name {:?} is declared twice", f.name),
            ));
        }
        if let Some(p) = &f.parameters {
            if !p.is_object() {
                return Err(invalid(
                    format!("tools[{i}].function.parameters"),
                    "parameters must be a JSON Schema object",
                ));
            }
        }
        functions.push(f);
    }
    let (required, only) = match choice {
        None => (false, None),
        Some(ToolChoice::Mode(m)) => match m.as_str() {
            "none" => return Ok(None),
            "auto" => (false, None),
            "required" => (true, None),
            other => {
                return Err(invalid(
                    "tool_choice",
                    format!("tool_choice {other:?} is not one of none, auto, required"),
                ))
            }
        },
        Some(ToolChoice::Named { kind, function }) => {
            if kind != "function" {
                return Err(invalid(
                    "tool_choice.type",
                    format!("tool_choice type {kind:?} is not supported; use \"function\""),
                ));
            }
            (true, Some(function.name.as_str()))
        }
    };
    if functions.is_empty() {
        if required {
            return Err(invalid(
                "tool_choice",
                "tool_choice requires a tool call, but no tools were given",
            ));
        }
        return Ok(None);
    }
    let callable: Vec<&FunctionDef> = match only {
        Some(name) => {
            let f = functions.iter().find(|f| f.name == name).ok_or_else(|| {
                invalid(
                    "tool_choice.function.name",
                    format!("tool_choice names {name:?}, which is not among the tools"),
                )
            })?;
            vec![*f]
        }
        None => functions.clone(),
    };
    let grammar = grammar(&callable, required, parallel).map_err(|e| {
        invalid(
            "tools",
            format!("a tool's parameters are not a JSON Schema this server can enforce: {e}"),
        )
    })?;
    Ok(Some(Plan {
        instructions: instructions(&functions, required, parallel),
        grammar,
    }))
}

/// The JSON Schema of the model's answer, written out by hand so that keys keep the order the
/// stream parser relies on (`name` before `arguments`): llama.cpp's converter keeps the order of
/// `properties`, while `serde_json`'s map would sort them.
fn answer_schema(callable: &[&FunctionDef], required: bool, parallel: bool) -> String {
    let calls: Vec<String> = callable
        .iter()
        .map(|f| {
            let params = f
                .parameters
                .as_ref()
                .map_or_else(|| r#"{"type":"object"}"#.to_string(), Value::to_string);
            format!(
                r#"{{"type":"object","properties":{{"name":{{"const":{}}},"arguments":{params}}},"required":["name","arguments"],"additionalProperties":false}}"#,
                Value::String(f.name.clone())
            )
        })
        .collect();
    let max = if parallel { "" } else { r#","maxItems":1"# };
    let tool_calls = format!(
        r#"{{"type":"object","properties":{{"tool_calls":{{"type":"array","items":{{"anyOf":[{}]}},"minItems":1{max}}}}},"required":["tool_calls"],"additionalProperties":false}}"#,
        calls.join(",")
    );
    if required {
        tool_calls
    } else {
        format!(
            r#"{{"anyOf":[{tool_calls},{{"type":"object","properties":{{"response":{{"type":"string"}}}},"required":["response"],"additionalProperties":false}}]}}"#
        )
    }
}

/// The converter's whitespace rule allows newlines and up to 20 spaces or tabs between any two
/// tokens, and a small model under the grammar can spend its whole budget there; a call needs
/// at most one space.
const TIGHT_SPACE: &str = r#"space ::= | " ""#;

fn grammar(callable: &[&FunctionDef], required: bool, parallel: bool) -> Result<String, String> {
    let converted =
        llama_cpp_2::json_schema_to_grammar(&answer_schema(callable, required, parallel))
            .map_err(|e| e.to_string())?;
    Ok(converted
        .lines()
        .map(|l| {
            if l.starts_with("space ::=") {
                TIGHT_SPACE
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// The system text that tells the model which tools it has and how to call them.
fn instructions(functions: &[&FunctionDef], required: bool, parallel: bool) -> String {
    let list: Vec<Value> = functions
        .iter()
        .map(|f| {
            let mut v = serde_json::json!({"name": f.name});
            if let Some(d) = &f.description {
                v["description"] = Value::String(d.clone());
            }
            if let Some(p) = &f.parameters {
                v["parameters"] = p.clone();
            }
            v
        })
        .collect();
    let mut text = format!(
        "You can call these tools:\n{}\n\nTo call {}, answer only with JSON: \
         {{\"tool_calls\": [{{\"name\": \"<tool name>\", \"arguments\": {{<arguments>}}}}]}}.",
        Value::Array(list),
        if parallel { "tools" } else { "a tool" },
    );
    if !required {
        text.push_str(
            " To answer the user directly, answer only with JSON: {\"response\": \"<your answer>\"}.",
        );
    }
    text.push_str(" Tool results come back in messages from the tool.");
    text
}

/// The text an assistant turn with tool calls is written back as: the JSON the model wrote.
pub fn past_calls_text(calls: &[PastCall], base: &str) -> Result<String, ApiError> {
    let mut out = Vec::with_capacity(calls.len());
    for (i, c) in calls.iter().enumerate() {
        if c.kind.as_deref().is_some_and(|k| k != "function") {
            return Err(invalid(
                format!("{base}.tool_calls[{i}].type"),
                "tool call type must be \"function\"",
            ));
        }
        // Arguments are a JSON text; one that is not JSON is passed on as a string.
        let arguments = serde_json::from_str::<Value>(&c.function.arguments)
            .unwrap_or_else(|_| Value::String(c.function.arguments.clone()));
        // By hand, to keep the model's key order (`name` first; serde_json's map would sort).
        out.push(format!(
            r#"{{"name":{},"arguments":{arguments}}}"#,
            Value::String(c.function.name.clone())
        ));
    }
    Ok(format!(r#"{{"tool_calls":[{}]}}"#, out.join(",")))
}

/// What [`CallParser`] found in a piece of generated text.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// Text of a `{"response": …}` answer, unescaped.
    Content(String),
    /// Call `index` began, with its function's name.
    Call { index: usize, name: String },
    /// More of call `index`'s arguments, as raw JSON text.
    Arguments { index: usize, text: String },
}

#[derive(Debug)]
struct Frame {
    object: bool,
    /// In an object: the next string is a key.
    expect_key: bool,
    /// In an object: the last key read.
    key: String,
}

/// Reads the model's JSON answer incrementally. The grammar guarantees its shape, so this only
/// needs to know where it is: the container stack, the last key at each level, and whether it
/// is inside a string.
#[derive(Debug, Default)]
pub struct CallParser {
    stack: Vec<Frame>,
    in_string: bool,
    /// The string being read is a key (collected into `text`), the `response` (streamed), or a
    /// call's `name` (collected).
    string_role: Role,
    escape: Option<String>,
    /// Pending high surrogate of a `\uD83D\uDE00` pair.
    surrogate: Option<u16>,
    text: String,
    /// Calls begun so far; the current one is `calls - 1`.
    calls: usize,
    /// Depth at which the current call's `arguments` object opened, while it is being read.
    arguments_depth: Option<usize>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Role {
    #[default]
    Other,
    Key,
    Response,
    Name,
}

impl CallParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls begun so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    pub fn push(&mut self, piece: &str) -> Vec<Found> {
        let mut found = Vec::new();
        let mut content = String::new();
        let mut args = String::new();
        for c in piece.chars() {
            if self.arguments_depth.is_some() {
                args.push(c);
            }
            if self.in_string {
                self.string_char(c, &mut content);
                if !self.in_string {
                    self.string_closed(&mut found, &mut content, &mut args);
                }
                continue;
            }
            match c {
                '"' => {
                    self.in_string = true;
                    self.text.clear();
                    self.string_role = match self.stack.last() {
                        Some(f) if f.object && f.expect_key => Role::Key,
                        Some(f) if f.object && self.stack.len() == 1 && f.key == "response" => {
                            Role::Response
                        }
                        Some(f) if f.object && self.stack.len() == 3 && f.key == "name" => {
                            Role::Name
                        }
                        _ => Role::Other,
                    };
                }
                '{' | '[' => {
                    let object = c == '{';
                    if object
                        && self.stack.len() == 2
                        && !self.stack[1].object
                        && self.stack[0].key == "tool_calls"
                    {
                        self.calls += 1;
                    }
                    if object
                        && self.arguments_depth.is_none()
                        && self.stack.len() == 3
                        && self.stack[2].key == "arguments"
                    {
                        self.arguments_depth = Some(3);
                        args.push(c);
                    }
                    self.stack.push(Frame {
                        object,
                        expect_key: object,
                        key: String::new(),
                    });
                }
                '}' | ']' => {
                    self.stack.pop();
                    if self.arguments_depth == Some(self.stack.len()) {
                        self.arguments_depth = None;
                        self.flush_args(&mut found, &mut args);
                    }
                }
                ':' => {
                    if let Some(f) = self.stack.last_mut() {
                        f.expect_key = false;
                    }
                }
                ',' => {
                    if let Some(f) = self.stack.last_mut() {
                        f.expect_key = f.object;
                    }
                }
                _ => {}
            }
        }
        if !content.is_empty() {
            found.push(Found::Content(content));
        }
        self.flush_args(&mut found, &mut args);
        found
    }

    fn flush_args(&mut self, found: &mut Vec<Found>, args: &mut String) {
        if !args.is_empty() {
            found.push(Found::Arguments {
                index: self.calls.saturating_sub(1),
                text: std::mem::take(args),
            });
        }
    }

    fn string_closed(&mut self, found: &mut Vec<Found>, content: &mut String, args: &mut String) {
        match self.string_role {
            Role::Key => {
                if let Some(f) = self.stack.last_mut() {
                    f.key = std::mem::take(&mut self.text);
                }
            }
            Role::Name => {
                // Text found before the call starts belongs before it.
                if !content.is_empty() {
                    found.push(Found::Content(std::mem::take(content)));
                }
                self.flush_args(found, args);
                found.push(Found::Call {
                    index: self.calls.saturating_sub(1),
                    name: std::mem::take(&mut self.text),
                });
            }
            Role::Response | Role::Other => {}
        }
    }

    /// One character inside a string: unescapes it into `content` (the response) or `text`
    /// (keys and names); a closing quote ends the string.
    fn string_char(&mut self, c: char, content: &mut String) {
        let sink = |this: &mut Self, content: &mut String, ch: char| match this.string_role {
            Role::Response => content.push(ch),
            Role::Key | Role::Name => this.text.push(ch),
            Role::Other => {}
        };
        if let Some(esc) = self.escape.as_mut() {
            esc.push(c);
            let decoded = match esc.as_str() {
                "\"" => Some('"'),
                "\\" => Some('\\'),
                "/" => Some('/'),
                "b" => Some('\u{8}'),
                "f" => Some('\u{c}'),
                "n" => Some('\n'),
                "r" => Some('\r'),
                "t" => Some('\t'),
                s if s.starts_with('u') && s.len() == 5 => {
                    let unit = u16::from_str_radix(&s[1..], 16).unwrap_or(0xFFFD);
                    self.escape = None;
                    let ch = match (self.surrogate.take(), unit) {
                        (None, 0xD800..=0xDBFF) => {
                            self.surrogate = Some(unit);
                            return;
                        }
                        (Some(hi), 0xDC00..=0xDFFF) => char::from_u32(
                            0x10000 + ((u32::from(hi) - 0xD800) << 10) + (u32::from(unit) - 0xDC00),
                        ),
                        (_, u) => char::from_u32(u32::from(u)),
                    };
                    sink(self, content, ch.unwrap_or('\u{FFFD}'));
                    return;
                }
                s if s.starts_with('u') => return,
                _ => Some('\u{FFFD}'),
            };
            self.escape = None;
            if let Some(ch) = decoded {
                sink(self, content, ch);
            }
            return;
        }
        match c {
            '\\' => self.escape = Some(String::new()),
            '"' => self.in_string = false,
            _ => sink(self, content, c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(json: &str) -> Vec<Tool> {
        serde_json::from_str(json).unwrap()
    }

    const WEATHER: &str = r#"[{"type":"function","function":{"name":"get_weather","description":"Weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]"#;

    fn parse_all(text: &str, split: usize) -> Vec<Found> {
        let mut p = CallParser::new();
        let chars: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        for piece in chars.chunks(split.max(1)) {
            out.extend(p.push(&piece.iter().collect::<String>()));
        }
        out
    }

    /// Joins consecutive pieces of the same kind, so results compare across splits.
    fn merged(found: Vec<Found>) -> Vec<Found> {
        let mut out: Vec<Found> = Vec::new();
        for f in found {
            match (out.last_mut(), f) {
                (Some(Found::Content(a)), Found::Content(b)) => a.push_str(&b),
                (
                    Some(Found::Arguments { index: i, text: a }),
                    Found::Arguments { index: j, text: b },
                ) if *i == j => a.push_str(&b),
                (_, f) => out.push(f),
            }
        }
        out
    }

    #[test]
    fn calls_and_arguments_come_out_whatever_the_split() {
        let text = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris \"FR\"", "n": [1, {"x": 2}]}}, {"name":"b","arguments":{}}]}"#;
        let expected = vec![
            Found::Call {
                index: 0,
                name: "get_weather".into(),
            },
            Found::Arguments {
                index: 0,
                text: r#"{"city": "Paris \"FR\"", "n": [1, {"x": 2}]}"#.into(),
            },
            Found::Call {
                index: 1,
                name: "b".into(),
            },
            Found::Arguments {
                index: 1,
                text: "{}".into(),
            },
        ];
        for split in [1, 2, 3, 7, 1000] {
            assert_eq!(merged(parse_all(text, split)), expected, "split {split}");
        }
    }

    #[test]
    fn a_response_is_unescaped_content() {
        let text = r#"{"response": "Hi \"you\"\n\u00e9\ud83d\ude00 {not json} \\"}"#;
        for split in [1, 2, 5, 1000] {
            assert_eq!(
                merged(parse_all(text, split)),
                vec![Found::Content("Hi \"you\"\né😀 {not json} \\".into())],
                "split {split}"
            );
        }
    }

    #[test]
    fn the_grammar_follows_the_choice() {
        let t = tools(WEATHER);
        let auto = plan(Some(&t), None, true).unwrap().unwrap();
        assert!(auto.grammar.contains("response"), "{}", auto.grammar);
        assert!(
            auto.grammar.lines().any(|l| l == TIGHT_SPACE),
            "{}",
            auto.grammar
        );
        assert!(auto.instructions.contains("get_weather"));
        let required = plan(Some(&t), Some(&ToolChoice::Mode("required".into())), true)
            .unwrap()
            .unwrap();
        assert!(!required.grammar.contains("response"));
        assert!(plan(Some(&t), Some(&ToolChoice::Mode("none".into())), true)
            .unwrap()
            .is_none());
        assert!(plan(None, None, true).unwrap().is_none());
    }

    #[test]
    fn bad_tools_name_their_field() {
        let cases = [
            (r#"[{"type":"retrieval"}]"#, None, "tools[0].type"),
            (
                r#"[{"type":"function","function":{"name":"a b"}}]"#,
                None,
                "tools[0].function.name",
            ),
            (
                r#"[{"type":"function","function":{"name":"a"}},{"type":"function","function":{"name":"a"}}]"#,
                None,
                "tools[1].function.name",
            ),
            (
                r#"[{"type":"function","function":{"name":"a","parameters":[1]}}]"#,
                None,
                "tools[0].function.parameters",
            ),
            (
                WEATHER,
                Some(ToolChoice::Named {
                    kind: "function".into(),
                    function: NamedFunction {
                        name: "nope".into(),
                    },
                }),
                "tool_choice.function.name",
            ),
            (
                WEATHER,
                Some(ToolChoice::Mode("sometimes".into())),
                "tool_choice",
            ),
            (
                "[]",
                Some(ToolChoice::Mode("required".into())),
                "tool_choice",
            ),
        ];
        for (json, choice, field) in cases {
            match plan(Some(&tools(json)), choice.as_ref(), true) {
                Err(ApiError::InvalidField { param, .. }) => assert_eq!(param, field, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn past_calls_are_written_back_as_the_model_wrote_them() {
        let calls: Vec<PastCall> = serde_json::from_str(
            r#"[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]"#,
        )
        .unwrap();
        assert_eq!(
            past_calls_text(&calls, "messages[1]").unwrap(),
            r#"{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}"#
        );
    }
}
