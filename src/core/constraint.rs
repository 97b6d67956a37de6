//! What a constrained output must match. The protocols map their fields
//! (`params.json_schema`, OpenAI's `response_format`...) to it; the engine
//! compiles it into a token mask per step (`engine::guide`).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// JSON matching this schema (`{"type": "object"}`: any object).
    JsonSchema(Value),
    /// Text matching this regular expression, whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A context-free grammar in llguidance's Lark syntax.
    Lark(String),
    /// A grammar in llama.cpp's GBNF (its `root` rule is the start).
    Gbnf(String),
}

impl Constraint {
    /// A grammar as a client sent it: GBNF (llama-server's `grammar`) when
    /// it defines rules with `::=`, which Lark never does; Lark otherwise.
    pub fn grammar(text: String) -> Constraint {
        if text.contains("::=") {
            Constraint::Gbnf(text)
        } else {
            Constraint::Lark(text)
        }
    }

    /// What it is, as error messages name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "JSON schema",
            Constraint::Regex(_) => "regex",
            Constraint::Choice(_) => "choice list",
            Constraint::Lark(_) => "grammar",
            Constraint::Gbnf(_) => "GBNF grammar",
        }
    }

    /// Its size in bytes, for the configured limit.
    pub fn size(&self) -> usize {
        match self {
            Constraint::JsonSchema(v) => v.to_string().len(),
            Constraint::Regex(s) | Constraint::Lark(s) | Constraint::Gbnf(s) => s.len(),
            Constraint::Choice(options) => options.iter().map(|o| o.len() + 1).sum(),
        }
    }
}
