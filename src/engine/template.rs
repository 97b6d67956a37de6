//! Chat templates as current GGUFs ship them: Jinja text, rendered with
//! minijinja (the engine TGI uses) and the globals Hugging Face's
//! `apply_chat_template` provides (`messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`, `raise_exception`, `strftime_now`), Python's
//! string methods included (minijinja-contrib's pycompat). Sans-I/O and
//! model-free: unit-tested against the known output of well-known templates.

use minijinja::{Environment, Error, ErrorKind, context};
use serde::Serialize;

/// How much work one rendering may do (minijinja's fuel: roughly one unit
/// per instruction), so no template loops without end.
const FUEL: u64 = 1_000_000;

/// Whether `text` is a Jinja template (not the name of a llama.cpp built-in).
pub fn is_jinja(text: &str) -> bool {
    text.contains("{%") || text.contains("{{")
}

#[derive(Debug, Clone, Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

/// A compiled chat template with the model's special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

impl ChatTemplate {
    /// Compiles `source`; an error says where it does not parse.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(FUEL));
        // As transformers renders them.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| describe(&e))?;
        env.set_syntax(syntax);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| {
            chrono::Local::now().format(&format).to_string()
        });
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| describe(&e))?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_owned(),
            eos: eos.to_owned(),
        })
    }

    /// Renders `(role, content)` turns and opens the assistant's turn. The
    /// BOS token a template writes first is left out: the tokenizer adds it.
    pub fn render(&self, messages: &[(&str, &str)]) -> Result<String, String> {
        let messages: Vec<Message> = messages
            .iter()
            .map(|&(role, content)| Message { role, content })
            .collect();
        let template = self.env.get_template("chat").map_err(|e| describe(&e))?;
        let text = template
            .render(context! {
                messages => minijinja::Value::from(minijinja::value::Serde(&messages)),
                add_generation_prompt => true,
                bos_token => self.bos.as_str(),
                eos_token => self.eos.as_str(),
                tools => (),
            })
            .map_err(|e| describe(&e))?;
        Ok(match text.strip_prefix(self.bos.as_str()) {
            Some(rest) if !self.bos.is_empty() => rest.to_owned(),
            _ => text,
        })
    }
}

/// An error with its cause chain (minijinja nests the detail).
fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gemma's template as its instruction-tuned GGUFs ship it (system
    /// folded into the first user turn, `model` for the assistant, trimmed).
    const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

    /// ChatML (Qwen and many others).
    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Llama 3's, with Python string methods and a date as Llama 3.1's uses.
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    const CHAT: [(&str, &str); 3] = [
        ("system", "Be brief."),
        ("user", " Hi! "),
        ("assistant", "Hello."),
    ];

    #[test]
    fn gemma_folds_the_system_prompt_and_trims() {
        let t = ChatTemplate::new(GEMMA, "<bos>", "<eos>").unwrap();
        assert_eq!(
            t.render(&[CHAT[0], CHAT[1], CHAT[2], ("user", "Bye")])
                .unwrap(),
            "<start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n\
             <start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n\
             <start_of_turn>model\n"
        );
        let e = t.render(&[("user", "a"), ("user", "b")]).unwrap_err();
        assert!(e.contains("Conversation roles must alternate"), "{e}");
    }

    #[test]
    fn chatml_keeps_every_role() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        assert_eq!(
            t.render(&CHAT).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi! <|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn llama3_headers_and_the_tokenizers_bos() {
        let t = ChatTemplate::new(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        assert_eq!(
            t.render(&CHAT[..2]).unwrap(),
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn python_methods_dates_and_bad_templates() {
        let t = ChatTemplate::new(
            "{{ messages[0].content.strip().upper() }}|{{ strftime_now('%Y') | length }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(t.render(&[("user", " hi ")]).unwrap(), "HI|4");
        let e = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(
            e.contains("syntax error") || e.contains("unexpected"),
            "{e}"
        );
        let endless = ChatTemplate::new(
            "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(endless.render(&[]).unwrap_err().contains("fuel"));
        assert!(is_jinja(GEMMA) && !is_jinja("chatml"));
    }
}
