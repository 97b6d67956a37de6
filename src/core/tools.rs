//! Tool calling, the same for every protocol and every chat template.
//!
//! The model is told about the tools in a system message and answers in
//! JSON that a schema constrains, so a call always parses: either
//! `{"tool_calls": [{"name": ..., "arguments": {...}}]}` or, when it may
//! also answer in words (`ToolChoice::Auto`), `{"response": "..."}`. Earlier
//! calls and their results go back into the conversation in the same JSON,
//! as assistant and user turns, so any template renders them (this is
//! llama.cpp's "generic" tool format; templates that know tools natively
//! get them the same way).

use serde_json::{Value, json};

use super::{ChatMessage, Constraint, Role};

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of its arguments (an object).
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub enum ToolChoice {
    /// A call or an answer in words, as the model decides.
    #[default]
    Auto,
    /// No call: the tools are not offered.
    None,
    /// At least one call.
    Required,
    /// A call of this function.
    Function(String),
}

impl ToolChoice {
    /// `"auto"`, `"none"` or `"required"`, as both APIs name them.
    pub fn named(name: &str) -> Option<ToolChoice> {
        match name {
            "auto" => Some(ToolChoice::Auto),
            "none" => Some(ToolChoice::None),
            "required" => Some(ToolChoice::Required),
            _ => None,
        }
    }
}

/// A call the model made; `arguments` is JSON text, as OpenAI sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// The tools of one request and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// More than one call in one answer.
    pub parallel: bool,
}

/// What a turn of the conversation holds beyond text.
#[derive(Debug, Clone, PartialEq)]
pub enum Turn {
    Message(ChatMessage),
    /// An assistant turn that called tools (with any text it wrote too).
    Calls {
        content: String,
        calls: Vec<ToolCall>,
    },
    /// The result of a call.
    Result {
        call_id: Option<String>,
        content: String,
    },
}

/// A reply parsed from the model's constrained JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Text(String),
    Calls(Vec<ToolCall>),
}

impl Tools {
    /// No tools: a conversation's earlier calls and results still render.
    pub fn none() -> Tools {
        Tools {
            tools: Vec::new(),
            choice: ToolChoice::None,
            parallel: false,
        }
    }

    /// Checks the tools and the choice against each other.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.tools.iter().enumerate() {
            let valid = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
            if !valid {
                return Err(format!(
                    "tools[{i}].function.name must be 1 to 64 letters, digits, _ - or ."
                ));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(format!("tools[{i}]: the name {:?} is used twice", t.name));
            }
            if !t.parameters.is_object() {
                return Err(format!(
                    "tools[{i}].function.parameters must be a JSON schema (an object)"
                ));
            }
        }
        match &self.choice {
            ToolChoice::Required if self.tools.is_empty() => {
                Err("tool_choice \"required\" needs tools".into())
            }
            ToolChoice::Function(name) if !self.tools.iter().any(|t| &t.name == name) => Err(
                format!("tool_choice names the function {name:?}, which is not among the tools"),
            ),
            _ => Ok(()),
        }
    }

    /// Whether the model is offered the tools at all.
    pub fn active(&self) -> bool {
        !self.tools.is_empty() && self.choice != ToolChoice::None
    }

    /// The conversation as the template sees it: the tools described in a
    /// system message, calls and results written as JSON.
    pub fn render(&self, turns: Vec<Turn>) -> Vec<ChatMessage> {
        let mut out: Vec<ChatMessage> = Vec::with_capacity(turns.len() + 1);
        if self.active() {
            out.push(ChatMessage {
                role: Role::System,
                content: self.instructions(),
            });
        }
        let mut after_result = false;
        for turn in turns {
            let is_result = matches!(turn, Turn::Result { .. });
            let (role, content) = match turn {
                Turn::Message(m) => (m.role, m.content),
                Turn::Calls { content, calls } => {
                    let calls: Vec<Value> = calls
                        .iter()
                        .map(|c| {
                            let args = serde_json::from_str(&c.arguments)
                                .unwrap_or_else(|_| Value::String(c.arguments.clone()));
                            json!({"name": c.name, "arguments": args})
                        })
                        .collect();
                    let mut text = json!({"tool_calls": calls}).to_string();
                    if !content.is_empty() {
                        text = format!("{content}\n{text}");
                    }
                    (Role::Assistant, text)
                }
                Turn::Result { call_id, content } => {
                    let result = json!({"tool_response": {"id": call_id, "content": content}});
                    (Role::User, result.to_string())
                }
            };
            match out.last_mut() {
                // Templates want roles to alternate: the results of one
                // turn's calls go back as one user turn.
                Some(last) if is_result && after_result => {
                    last.content.push('\n');
                    last.content.push_str(&content);
                }
                _ => out.push(ChatMessage { role, content }),
            }
            after_result = is_result;
        }
        // One system message: the client's own first, then the tools.
        if self.active() && out.get(1).is_some_and(|m| m.role == Role::System) {
            let own = out.remove(1);
            out[0].content = format!("{}\n\n{}", own.content, out[0].content);
        }
        out
    }

    fn instructions(&self) -> String {
        let specs: Vec<Value> = self
            .tools
            .iter()
            .map(|t| {
                json!({"name": t.name, "description": t.description, "parameters": t.parameters})
            })
            .collect();
        let how = match &self.choice {
            ToolChoice::Auto => {
                "Respond in JSON: {\"tool_calls\": [{\"name\": ..., \"arguments\": {...}}]} to call tools, or {\"response\": \"...\"} to answer the user directly."
                    .to_owned()
            }
            ToolChoice::Function(name) => format!(
                "Respond in JSON, calling {name}: {{\"tool_calls\": [{{\"name\": \"{name}\", \"arguments\": {{...}}}}]}}."
            ),
            _ => "Respond in JSON, calling tools: {\"tool_calls\": [{\"name\": ..., \"arguments\": {...}}]}."
                .to_owned(),
        };
        format!(
            "You can call these tools:\n{}\n{how} A tool's result comes back as {{\"tool_response\": ...}}.",
            Value::Array(specs)
        )
    }

    /// What the reply must match; `None` when the tools are not offered.
    pub fn constraint(&self) -> Option<Constraint> {
        if !self.active() {
            return None;
        }
        let call = |t: &Tool| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        };
        let calls: Vec<Value> = match &self.choice {
            ToolChoice::Function(name) => self
                .tools
                .iter()
                .filter(|t| &t.name == name)
                .map(call)
                .collect(),
            _ => self.tools.iter().map(call).collect(),
        };
        let mut list = json!({"type": "array", "items": {"anyOf": calls}, "minItems": 1});
        if !self.parallel {
            list["maxItems"] = json!(1);
        }
        let calling = json!({
            "type": "object",
            "properties": {"tool_calls": list},
            "required": ["tool_calls"],
            "additionalProperties": false,
        });
        let schema = match self.choice {
            ToolChoice::Auto => json!({"anyOf": [calling, {
                "type": "object",
                "properties": {"response": {"type": "string"}},
                "required": ["response"],
                "additionalProperties": false,
            }]}),
            _ => calling,
        };
        Some(Constraint::JsonSchema(schema))
    }
}

/// Reads the model's constrained reply, naming its calls `call_{ids}_{i}`;
/// `None` when it is not complete JSON (cut by `max_tokens`): the caller
/// then sends the text as it is.
pub fn parse_answer(text: &str, ids: &str) -> Option<Answer> {
    let value: Value = serde_json::from_str(text.trim()).ok()?;
    if let Some(calls) = value.get("tool_calls").and_then(Value::as_array) {
        let calls = calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let name = c.get("name")?.as_str()?.to_owned();
                let arguments = c.get("arguments").cloned().unwrap_or(json!({}));
                Some(ToolCall {
                    id: format!("call_{ids}_{i}"),
                    name,
                    arguments: arguments.to_string(),
                })
            })
            .collect::<Option<Vec<_>>>()?;
        return Some(Answer::Calls(calls));
    }
    value
        .get("response")
        .and_then(Value::as_str)
        .map(|s| Answer::Text(s.to_owned()))
}

/// The answer's text so far while `{"response": "...` is still arriving
/// (the constrained JSON is compact, so it starts exactly so), up to the last
/// character that is whole; `None` while the reply is not (yet) an answer.
pub fn partial_answer(text: &str) -> Option<String> {
    let rest = text.strip_prefix(r#"{"response": ""#)?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => break,
            '\\' => {
                let Some(e) = chars.next() else { break };
                let simple = match e {
                    'n' => Some('\n'),
                    't' => Some('\t'),
                    'r' => Some('\r'),
                    'b' => Some('\u{8}'),
                    'f' => Some('\u{c}'),
                    'u' => None,
                    other => Some(other), // \" \\ \/
                };
                match simple {
                    Some(c) => out.push(c),
                    None => {
                        let hex: String = chars.by_ref().take(4).collect();
                        let Some(unit) = whole_hex(&hex) else { break };
                        if (0xD800..0xDC00).contains(&unit) {
                            // A surrogate pair: the low half must follow.
                            let low: String = chars.by_ref().take(6).collect();
                            let Some(low) = low.strip_prefix("\\u").and_then(whole_hex) else {
                                break;
                            };
                            match char::decode_utf16([unit, low]).next() {
                                Some(Ok(c)) => out.push(c),
                                _ => break,
                            }
                        } else {
                            match char::from_u32(unit.into()) {
                                Some(c) => out.push(c),
                                None => break,
                            }
                        }
                    }
                }
            }
            c => out.push(c),
        }
    }
    Some(out)
}

/// Four hex digits, all there.
fn whole_hex(hex: &str) -> Option<u16> {
    (hex.len() == 4).then(|| u16::from_str_radix(hex, 16).ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: Some("Weather in a city".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        }
    }

    fn tools(choice: ToolChoice) -> Tools {
        Tools {
            tools: vec![weather()],
            choice,
            parallel: true,
        }
    }

    fn user(text: &str) -> Turn {
        Turn::Message(ChatMessage {
            role: Role::User,
            content: text.into(),
        })
    }

    #[test]
    fn calls_and_results_render_as_alternating_json_turns() {
        let call = ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        };
        let turns = vec![
            user("Weather in Paris?"),
            Turn::Calls {
                content: String::new(),
                calls: vec![call],
            },
            Turn::Result {
                call_id: Some("call_1".into()),
                content: "sunny".into(),
            },
            Turn::Result {
                call_id: None,
                content: "22 C".into(),
            },
        ];
        let m = tools(ToolChoice::Auto).render(turns);
        let roles: Vec<Role> = m.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [Role::System, Role::User, Role::Assistant, Role::User]
        );
        assert!(m[0].content.contains("get_weather") && m[0].content.contains("\"response\""));
        let written: Value = serde_json::from_str(&m[2].content).unwrap();
        assert_eq!(
            written,
            json!({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
        );
        assert!(m[3].content.contains("sunny") && m[3].content.contains("22 C"));
        let none = tools(ToolChoice::None).render(vec![user("hi")]);
        assert_eq!(none.len(), 1);
    }

    #[test]
    fn the_choice_shapes_the_schema() {
        let Some(Constraint::JsonSchema(auto)) = tools(ToolChoice::Auto).constraint() else {
            panic!()
        };
        assert!(auto["anyOf"].as_array().is_some_and(|a| a.len() == 2));
        let Some(Constraint::JsonSchema(required)) = tools(ToolChoice::Required).constraint()
        else {
            panic!()
        };
        assert_eq!(required["required"], json!(["tool_calls"]));
        assert_eq!(
            required["properties"]["tool_calls"]["items"]["anyOf"][0]["properties"]["name"],
            json!({"const": "get_weather"})
        );
        assert_eq!(tools(ToolChoice::None).constraint(), None);
    }

    #[test]
    fn conflicting_choices_are_refused() {
        assert!(
            tools(ToolChoice::Function("nope".into()))
                .validate()
                .is_err()
        );
        let empty = Tools {
            tools: vec![],
            choice: ToolChoice::Required,
            parallel: true,
        };
        assert!(empty.validate().unwrap_err().contains("needs tools"));
        let mut twice = tools(ToolChoice::Auto);
        twice.tools.push(weather());
        assert!(twice.validate().unwrap_err().contains("twice"));
        let mut bad = tools(ToolChoice::Auto);
        bad.tools[0].name = "has space".into();
        assert!(bad.validate().is_err());
        tools(ToolChoice::Function("get_weather".into()))
            .validate()
            .unwrap();
    }

    #[test]
    fn an_answer_streams_as_its_json_arrives() {
        let whole = r#"{"response": "Hi \"you\"\n\u00e9\ud83d\ude00 end"}"#;
        let Some(Answer::Text(full)) = parse_answer(whole, "r1") else {
            panic!()
        };
        let mut sent = String::new();
        for end in 0..=whole.len() {
            let Some(so_far) = whole.get(..end).and_then(partial_answer) else {
                continue;
            };
            assert!(so_far.starts_with(&sent), "{so_far:?} after {sent:?}");
            assert!(
                full.starts_with(&so_far),
                "{so_far:?} is not a prefix of {full:?}"
            );
            sent = so_far;
        }
        assert_eq!(sent, full);
        assert_eq!(partial_answer(r#"{"tool_calls": ["#), None);
        assert_eq!(partial_answer(r#"{"resp"#), None);
    }

    #[test]
    fn answers_parse() {
        assert_eq!(
            parse_answer(
                r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}"#,
                "r1"
            ),
            Some(Answer::Calls(vec![ToolCall {
                id: "call_r1_0".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Oslo"}"#.into()
            }]))
        );
        assert_eq!(
            parse_answer(r#" {"response": "Hello"} "#, "r1"),
            Some(Answer::Text("Hello".into()))
        );
        assert_eq!(
            parse_answer(r#"{"tool_calls": [{"name": "get_"#, "r1"),
            None
        );
    }
}
