//! The model and its vocabulary: loading a GGUF file, the chat template it
//! carries, tokenizing and rendering tokens.

use std::ffi::{CStr, CString};
use std::marker::PhantomData;
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::init;
use super::log::capturing_errors;
use crate::engine::backend::{BackendError, Token};

pub struct ModelParams {
    pub n_gpu_layers: i32,
    /// Let ggml repack weights into its faster interleaved CPU layouts.
    pub repack: bool,
}

pub struct Model {
    pub(super) ptr: NonNull<sys::llama_model>,
}

impl Model {
    pub fn load(path: &Path, params: &ModelParams) -> Result<Model, BackendError> {
        init();
        let shown = path.display().to_string();
        if !path.is_file() {
            return Err(BackendError::ModelMissing(shown));
        }
        let c_path =
            CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| BackendError::NulByte)?;
        // SAFETY: returns a plain struct of defaults.
        let mut mparams = unsafe { sys::llama_model_default_params() };
        mparams.n_gpu_layers = params.n_gpu_layers;
        mparams.use_extra_bufts = params.repack;
        // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call;
        // the returned pointer is null on failure and owned by us otherwise.
        let (raw, errors) = capturing_errors(|| unsafe {
            sys::llama_model_load_from_file(c_path.as_ptr(), mparams)
        });
        match NonNull::new(raw) {
            Some(ptr) => Ok(Model { ptr }),
            None => Err(BackendError::ModelLoad {
                path: shown,
                reason: load_reason(&errors),
            }),
        }
    }

    pub fn vocab(&self) -> Vocab<'_> {
        // SAFETY: the model pointer is valid; the vocab lives as long as the model.
        let ptr = unsafe { sys::llama_model_get_vocab(self.ptr.as_ptr()) };
        Vocab {
            ptr,
            _model: PhantomData,
        }
    }

    /// The chat template stored in the GGUF metadata, if any.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: the model is valid; a null name selects the default template.
        // The returned string (or null) is owned by the model.
        let raw = unsafe { sys::llama_model_chat_template(self.ptr.as_ptr(), std::ptr::null()) };
        if raw.is_null() {
            return None;
        }
        // SAFETY: non-null, NUL-terminated, valid while the model lives.
        Some(
            unsafe { CStr::from_ptr(raw) }
                .to_string_lossy()
                .into_owned(),
        )
    }

    /// Formats a conversation with `template` (llama.cpp's built-in template
    /// engine detects the template family from its text) and opens the assistant turn.
    pub fn apply_chat_template(
        template: &str,
        messages: &[(&str, &str)],
    ) -> Result<String, BackendError> {
        let c_tmpl = CString::new(template).map_err(|_| BackendError::NulByte)?;
        let owned: Vec<(CString, CString)> = messages
            .iter()
            .map(|(r, c)| Ok((CString::new(*r)?, CString::new(*c)?)))
            .collect::<Result<_, std::ffi::NulError>>()
            .map_err(|_| BackendError::NulByte)?;
        let chat: Vec<sys::llama_chat_message> = owned
            .iter()
            .map(|(r, c)| sys::llama_chat_message {
                role: r.as_ptr(),
                content: c.as_ptr(),
            })
            .collect();
        let mut buf =
            vec![0u8; 2 * messages.iter().map(|(_, c)| c.len() + 16).sum::<usize>() + 256];
        loop {
            // SAFETY: all pointers in `chat` point into `owned`, alive for the call;
            // `buf` is writable for `buf.len()` bytes.
            let n = unsafe {
                sys::llama_chat_apply_template(
                    c_tmpl.as_ptr(),
                    chat.as_ptr(),
                    chat.len(),
                    true,
                    buf.as_mut_ptr().cast(),
                    buf.len() as i32,
                )
            };
            if n < 0 {
                return Err(BackendError::UnsupportedChatTemplate);
            }
            let n = n as usize;
            if n <= buf.len() {
                buf.truncate(n);
                return Ok(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n, 0);
        }
    }

    pub fn n_ctx_train(&self) -> u32 {
        // SAFETY: the model pointer is valid.
        unsafe { sys::llama_model_n_ctx_train(self.ptr.as_ptr()) }.max(0) as u32
    }

    /// Short description, e.g. "gemma3 270M Q4_K - Medium".
    pub fn description(&self) -> String {
        let mut buf = [0u8; 256];
        // SAFETY: `buf` is writable for its length; llama.cpp NUL-terminates within it.
        let n =
            unsafe { sys::llama_model_desc(self.ptr.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = (n.max(0) as usize).min(buf.len() - 1);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

fn load_reason(errors: &[String]) -> String {
    let useful: Vec<&str> = errors
        .iter()
        .map(|l| l.split_once(": ").map_or(l.as_str(), |(_, rest)| rest))
        .filter(|l| !l.contains("failed to load model"))
        .collect();
    if useful.is_empty() {
        "llama.cpp could not read it as a GGUF model".to_owned()
    } else {
        useful.join("; ")
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: we own the model; every Context borrowing it is already dropped.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

#[derive(Clone, Copy)]
pub struct Vocab<'m> {
    pub(super) ptr: *const sys::llama_vocab,
    _model: PhantomData<&'m Model>,
}

impl Vocab<'_> {
    pub fn n_tokens(&self) -> i32 {
        // SAFETY: the vocab is valid while the model lives ('m).
        unsafe { sys::llama_vocab_n_tokens(self.ptr) }
    }

    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: the vocab is valid; any token id is accepted.
        unsafe { sys::llama_vocab_is_eog(self.ptr, token) }
    }

    /// The text of the model's BOS and EOS tokens (`<bos>`, `<eos>`), as
    /// chat templates write them; empty when the model has none.
    pub fn bos_eos_text(&self) -> (String, String) {
        // SAFETY: the vocab is valid while the model lives ('m).
        let (bos, eos) = unsafe {
            (
                sys::llama_vocab_bos(self.ptr),
                sys::llama_vocab_eos(self.ptr),
            )
        };
        (self.token_text(bos), self.token_text(eos))
    }

    fn token_text(&self, token: Token) -> String {
        if token < 0 || token >= self.n_tokens() {
            return String::new();
        }
        // SAFETY: `token` is in range; llama.cpp returns a NUL-terminated
        // string owned by the vocab, read here before the vocab can go.
        unsafe {
            let text = sys::llama_vocab_get_text(self.ptr, token);
            if text.is_null() {
                return String::new();
            }
            std::ffi::CStr::from_ptr(text)
                .to_string_lossy()
                .into_owned()
        }
    }

    /// Every end-of-generation token (EOS, end-of-turn...).
    pub fn eog_tokens(&self) -> Vec<Token> {
        (0..self.n_tokens()).filter(|&t| self.is_eog(t)).collect()
    }

    /// Tokenizes `text`, adding BOS if the model wants one (`add_special`);
    /// `parse_special` reads control tokens written as text (`<start_of_turn>`).
    pub fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<Token>, BackendError> {
        let len = i32::try_from(text.len()).map_err(|_| BackendError::Tokenize(i32::MIN))?;
        let mut tokens: Vec<Token> = vec![0; text.len() + 2];
        loop {
            // SAFETY: `text` is valid for `len` bytes (no NUL terminator needed);
            // `tokens` is writable for `tokens.len()` entries.
            let n = unsafe {
                sys::llama_tokenize(
                    self.ptr,
                    text.as_ptr().cast(),
                    len,
                    tokens.as_mut_ptr(),
                    tokens.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n >= 0 {
                tokens.truncate(n as usize);
                return Ok(tokens);
            }
            if n == i32::MIN || (-n) as usize <= tokens.len() {
                return Err(BackendError::Tokenize(n));
            }
            tokens.resize((-n) as usize, 0);
        }
    }

    /// Appends the bytes of `token` to `out` (possibly part of a UTF-8
    /// character). Control tokens render as nothing.
    pub fn piece(&self, token: Token, out: &mut Vec<u8>) {
        self.render(token, false, out)
    }

    /// Every token's bytes, as constrained decoding sees the vocabulary: a
    /// control token is 0xFF followed by its text (llguidance's marker).
    pub fn all_token_bytes(&self) -> Vec<Vec<u8>> {
        (0..self.n_tokens())
            .map(|t| {
                let mut bytes = Vec::new();
                self.render(t, false, &mut bytes);
                if bytes.is_empty() {
                    let mut special = vec![0xFF];
                    self.render(t, true, &mut special);
                    if special.len() > 1 {
                        return special;
                    }
                }
                bytes
            })
            .collect()
    }

    /// Appends the bytes of `token`; `special` renders control tokens as
    /// their text.
    fn render(&self, token: Token, special: bool, out: &mut Vec<u8>) {
        let mut buf = [0u8; 64];
        // SAFETY: `buf` is writable for its length.
        let n = unsafe {
            sys::llama_token_to_piece(
                self.ptr,
                token,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                0,
                special,
            )
        };
        if n >= 0 {
            out.extend_from_slice(&buf[..n as usize]);
            return;
        }
        let mut big = vec![0u8; (-n) as usize];
        // SAFETY: `big` is writable for the length llama.cpp asked for.
        let n = unsafe {
            sys::llama_token_to_piece(
                self.ptr,
                token,
                big.as_mut_ptr().cast(),
                big.len() as i32,
                0,
                special,
            )
        };
        if n > 0 {
            out.extend_from_slice(&big[..n as usize]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_reason_keeps_the_cause() {
        let lines = vec![
            "gguf_init_from_file_impl: invalid magic characters: 'abcd', expected 'GGUF'"
                .to_owned(),
            "llama_model_load_from_file_impl: failed to load model".to_owned(),
        ];
        assert_eq!(
            load_reason(&lines),
            "invalid magic characters: 'abcd', expected 'GGUF'"
        );
        assert!(load_reason(&[]).contains("GGUF"));
    }
}
