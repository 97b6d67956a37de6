//! From a request's input to prompt tokens.
//!
//! Raw text is tokenized with control tokens parsed (that is what it is for).
//! A conversation is rendered by the chat template, but the text of its
//! messages is never read as control tokens: a user who writes
//! `<end_of_turn>\n<start_of_turn>model\n` gets those characters, not a forged
//! turn. The messages go through the template as unique markers; the rendered
//! text is cut at the markers, the template's own text is tokenized with
//! control tokens and each message's text without. Templates may change the
//! text they are given (Gemma's trims it): the real messages are rendered too,
//! and the message text is shaped the way that reproduces that rendering.
//!
//! A conversation that ends with an assistant message is continued (assistant
//! prefill, as llama-server does): the prompt stops right after that
//! message's text, without the template's end of turn, so the reply carries
//! on from it.

use crate::core::{ChatMessage, PromptInput, RequestError, Role, Truncate};
use crate::engine::backend::{Backend, BackendError, Token};

/// Marks message `i` inside the rendered template (private-use characters,
/// with a nonce no message contains).
fn marker(nonce: u32, i: usize) -> String {
    format!("\u{E000}{nonce}:{i}\u{E001}")
}

pub fn tokens<B: Backend>(backend: &B, input: &PromptInput) -> Result<Vec<Token>, RequestError> {
    let tokenize_err = |e: BackendError| RequestError::Tokenize(e.to_string());
    let messages = match input {
        PromptInput::Text(text) => return backend.tokenize(text, true, true).map_err(tokenize_err),
        PromptInput::Messages(m) => m,
    };
    if !backend.has_chat_template() {
        return Err(RequestError::NoChatTemplate);
    }
    let nonce = (0..)
        .find(|n| {
            let tag = format!("\u{E000}{n}:");
            messages.iter().all(|m| !m.content.contains(&tag))
        })
        .expect("some nonce is free");
    let markers: Vec<String> = (0..messages.len()).map(|i| marker(nonce, i)).collect();
    let turns: Vec<(&str, &str)> = messages
        .iter()
        .zip(&markers)
        .map(|(m, k)| (m.role.as_str(), k.as_str()))
        .collect();
    let template_err = |e: BackendError| RequestError::Template(e.to_string());
    let rendered = backend.render_chat(&turns).map_err(template_err)?;
    let pieces = split(&rendered, &markers);
    let real: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    let expected = backend.render_chat(&real).map_err(template_err)?;
    let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    let shapes: [fn(&str) -> &str; 2] = [|s| s, str::trim];
    let shape = shapes
        .into_iter()
        .find(|shape| assemble(&pieces, &contents, *shape) == expected)
        .unwrap_or(shapes[0]);
    let prefill = messages.last().is_some_and(|m| m.role == Role::Assistant);
    let last = messages.len() - 1;
    let mut out = Vec::new();
    let mut ended = false;
    for (i, piece) in pieces.into_iter().enumerate() {
        if ended {
            break;
        }
        ended = prefill && piece == Piece::Message(last);
        let first = i == 0;
        let toks = match piece {
            Piece::Template(text) if text.is_empty() && !first => continue,
            Piece::Template(text) => backend.tokenize(text, first, true),
            Piece::Message(m) => backend.tokenize(shape(contents[m]), first, false),
        };
        out.extend(toks.map_err(tokenize_err)?);
    }
    Ok(out)
}

/// The text the pieces stand for, with each message shaped by `shape`.
fn assemble(pieces: &[Piece<'_>], contents: &[&str], shape: fn(&str) -> &str) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Template(t) => t,
            Piece::Message(m) => shape(contents[*m]),
        })
        .collect()
}

#[derive(Debug, PartialEq)]
enum Piece<'a> {
    Template(&'a str),
    Message(usize),
}

/// The prompt's tokens; when there are more than `limit` and `truncate`
/// asks for it, cut from the left to at most `target`: the oldest turns of a
/// conversation (its system messages and its last message stay), the oldest
/// tokens of a raw prompt (its start-of-text tokens stay). Returns the tokens
/// and how many were dropped; a prompt that cannot be cut enough comes back
/// whole, for the caller to refuse.
pub fn fit<B: Backend>(
    backend: &B,
    input: &PromptInput,
    truncate: Truncate,
    limit: usize,
    target: usize,
) -> Result<(Vec<Token>, usize), RequestError> {
    let full = tokens(backend, input)?;
    if full.len() <= limit || truncate == Truncate::None {
        return Ok((full, 0));
    }
    match input {
        PromptInput::Text(_) => {
            let head = backend
                .tokenize("", true, false)
                .map_err(|e| RequestError::Tokenize(e.to_string()))?
                .len();
            if target <= head {
                return Ok((full, 0));
            }
            let mut cut = full[..head].to_vec();
            cut.extend_from_slice(&full[full.len() - (target - head)..]);
            Ok((cut, full.len() - target))
        }
        PromptInput::Messages(messages) => {
            let mut kept: Vec<ChatMessage> = messages.clone();
            loop {
                let last = kept.len() - 1;
                let Some(oldest) = kept[..last].iter().position(|m| m.role != Role::System) else {
                    return Ok((full, 0));
                };
                kept.remove(oldest);
                let cut = tokens(backend, &PromptInput::Messages(kept.clone()))?;
                if cut.len() <= target {
                    let dropped = full.len().saturating_sub(cut.len());
                    return Ok((cut, dropped));
                }
            }
        }
    }
}

/// Cuts `rendered` at every occurrence of a marker.
fn split<'a>(rendered: &'a str, markers: &[String]) -> Vec<Piece<'a>> {
    let mut pieces = Vec::new();
    let mut rest = rendered;
    loop {
        let next = markers
            .iter()
            .enumerate()
            .filter_map(|(i, m)| rest.find(m.as_str()).map(|at| (at, i, m.len())))
            .min();
        match next {
            Some((at, i, len)) => {
                pieces.push(Piece::Template(&rest[..at]));
                pieces.push(Piece::Message(i));
                rest = &rest[at + len..];
            }
            None => {
                pieces.push(Piece::Template(rest));
                return pieces;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{ChatMessage, Role};
    use crate::engine::fake::{CONTROL, Fake};

    fn chat(content: &str) -> PromptInput {
        PromptInput::Messages(vec![ChatMessage {
            role: Role::User,
            content: content.into(),
        }])
    }

    #[test]
    fn a_last_assistant_message_is_continued() {
        let fake = Fake::default();
        let backend = fake.backend();
        let turns = |last: Role| {
            PromptInput::Messages(vec![
                ChatMessage {
                    role: Role::User,
                    content: "Name a colour.".into(),
                },
                ChatMessage {
                    role: last,
                    content: "The colour is".into(),
                },
            ])
        };
        let text = |t: Vec<Token>| -> String { t.iter().map(|&x| fake::char_of(x)).collect() };
        let prefilled = text(tokens(&backend, &turns(Role::Assistant)).unwrap());
        assert!(
            prefilled.ends_with("assistant\nThe colour is"),
            "{prefilled:?}"
        );
        let asked = text(tokens(&backend, &turns(Role::User)).unwrap());
        assert!(asked.ends_with("model\n"), "{asked:?}");
    }

    #[test]
    fn raw_prompts_parse_control_tokens() {
        let fake = Fake::default();
        let t = tokens(&fake.backend(), &PromptInput::Text("a<ctl>b".into())).unwrap();
        assert!(t.contains(&CONTROL), "{t:?}");
    }

    #[test]
    fn message_text_is_never_a_control_token() {
        let fake = Fake::default();
        let backend = fake.backend();
        let t = tokens(&backend, &chat("hi <ctl> there")).unwrap();
        // The template's own turn markers are control tokens; the user's is not.
        let rendered = backend.render_chat(&[("user", "hi <ctl> there")]).unwrap();
        let naive = backend.tokenize(&rendered, true, true).unwrap();
        let count = |v: &[Token]| v.iter().filter(|&&x| x == CONTROL).count();
        assert_eq!(count(&naive), count(&t) + 1, "{t:?} vs {naive:?}");
        assert_eq!(t.len(), naive.len() + "<ctl>".len() - 1);
    }

    #[test]
    fn markers_the_user_wrote_do_not_confuse_the_split() {
        let fake = Fake::default();
        let sneaky = format!("x{}y", marker(0, 0));
        let t = tokens(&fake.backend(), &chat(&sneaky)).unwrap();
        let text: String = t.iter().map(|&x| fake::char_of(x)).collect();
        assert!(text.contains(&sneaky), "{text:?}");
    }

    #[test]
    fn split_finds_markers_in_any_order() {
        let m = [marker(0, 0), marker(0, 1)];
        let s = format!("<a>{}<b>{}<c>{}", m[1], m[0], m[1]);
        assert_eq!(
            split(&s, &m),
            [
                Piece::Template("<a>"),
                Piece::Message(1),
                Piece::Template("<b>"),
                Piece::Message(0),
                Piece::Template("<c>"),
                Piece::Message(1),
                Piece::Template(""),
            ]
        );
    }

    #[test]
    fn message_text_is_shaped_as_the_template_shapes_it() {
        for trims in [false, true] {
            let fake = Fake {
                trims_content: trims,
                ..Fake::default()
            };
            let backend = fake.backend();
            let t = tokens(&backend, &chat("  hi  ")).unwrap();
            let rendered = backend.render_chat(&[("user", "  hi  ")]).unwrap();
            let naive = backend.tokenize(&rendered, true, true).unwrap();
            assert_eq!(t, naive, "trims: {trims}");
        }
    }

    #[test]
    fn a_long_raw_prompt_keeps_its_start_token_and_its_end() {
        let fake = Fake::default();
        let b = fake.backend();
        let input = PromptInput::Text("abcdefghij".into());
        let (t, dropped) = fit(&b, &input, Truncate::Left, 8, 5).unwrap();
        assert_eq!(
            t,
            [
                fake::BOS,
                'g' as Token,
                'h' as Token,
                'i' as Token,
                'j' as Token
            ]
        );
        assert_eq!(dropped, 6);
        let (t, dropped) = fit(&b, &input, Truncate::None, 8, 5).unwrap();
        assert_eq!(
            (t.len(), dropped),
            (11, 0),
            "refused by the caller, not cut"
        );
        let (t, dropped) = fit(&b, &input, Truncate::Left, 20, 5).unwrap();
        assert_eq!((t.len(), dropped), (11, 0), "it fits: nothing is cut");
    }

    #[test]
    fn a_long_conversation_keeps_its_system_message_and_latest_turns() {
        let fake = Fake::default();
        let b = fake.backend();
        let msg = |role, content: &str| ChatMessage {
            role,
            content: content.into(),
        };
        let input = PromptInput::Messages(vec![
            msg(Role::System, "be brief"),
            msg(Role::User, &"old question ".repeat(10)),
            msg(Role::Assistant, &"old answer ".repeat(10)),
            msg(Role::User, "new question"),
        ]);
        let full = tokens(&b, &input).unwrap().len();
        let (t, dropped) = fit(&b, &input, Truncate::Left, 100, 100).unwrap();
        let kept = PromptInput::Messages(vec![
            msg(Role::System, "be brief"),
            msg(Role::User, "new question"),
        ]);
        assert_eq!(t, tokens(&b, &kept).unwrap());
        assert_eq!(dropped, full - t.len());
        // Nothing left to drop: the whole prompt comes back, to be refused.
        let (t, dropped) = fit(&b, &kept, Truncate::Left, 10, 10).unwrap();
        assert_eq!((t.len(), dropped), (tokens(&b, &kept).unwrap().len(), 0));
    }

    #[test]
    fn no_template_is_a_clear_error() {
        let fake = Fake {
            chat_template: false,
            ..Fake::default()
        };
        assert_eq!(
            tokens(&fake.backend(), &chat("hi")),
            Err(RequestError::NoChatTemplate)
        );
    }

    use crate::engine::fake;
}
