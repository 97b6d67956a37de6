//! Turns the byte pieces of sampled tokens into text that is safe to send.
//!
//! Two things are held back: the bytes of a UTF-8 character split across
//! tokens (sent once the character is complete), and text that may be the
//! beginning of a stop string (sent once it turns out not to be one; a stop
//! string itself is never sent). Sans-I/O and model-free, so it is unit-tested
//! exhaustively here.

#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Text that may be sent now (possibly empty: everything is held back).
    Emit(String),
    /// A stop string was found: send this last text, then end with `stop`.
    Stop(String),
}

#[derive(Debug, Default)]
pub struct TextStream {
    /// Bytes of an incomplete UTF-8 character.
    partial: Vec<u8>,
    /// Decoded text that might still turn into a stop string.
    held: String,
    stops: Vec<String>,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> TextStream {
        TextStream {
            stops,
            ..TextStream::default()
        }
    }

    pub fn push(&mut self, bytes: &[u8]) -> Step {
        self.partial.extend_from_slice(bytes);
        self.decode_partial();
        if let Some(at) = self.earliest_stop() {
            self.held.truncate(at);
            return Step::Stop(std::mem::take(&mut self.held));
        }
        let keep = self.longest_stop_prefix_suffix();
        let emit_to = self.held.len() - keep;
        let rest = self.held.split_off(emit_to);
        Step::Emit(std::mem::replace(&mut self.held, rest))
    }

    /// The generation ended for another reason: release everything held
    /// (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        if !self.partial.is_empty() {
            self.held.push_str(&String::from_utf8_lossy(&self.partial));
            self.partial.clear();
        }
        std::mem::take(&mut self.held)
    }

    /// Moves every complete character from `partial` to `held`. Invalid
    /// sequences (not merely incomplete ones) become U+FFFD so they never stall.
    fn decode_partial(&mut self) {
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.partial[start..]) {
                Ok(s) => {
                    self.held.push_str(s);
                    self.partial.clear();
                    return;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    self.held.push_str(
                        std::str::from_utf8(&self.partial[start..valid]).expect("validated"),
                    );
                    match e.error_len() {
                        Some(bad) => {
                            self.held.push(char::REPLACEMENT_CHARACTER);
                            start = valid + bad;
                        }
                        None => {
                            self.partial.drain(..valid);
                            return;
                        }
                    }
                }
            }
        }
    }

    fn earliest_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            let max = stop.len().saturating_sub(1).min(self.held.len());
            for len in (best + 1..=max).rev() {
                let start = self.held.len() - len;
                if self.held.is_char_boundary(start)
                    && stop.as_bytes().starts_with(&self.held.as_bytes()[start..])
                {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emit(s: &str) -> Step {
        Step::Emit(s.to_owned())
    }

    #[test]
    fn plain_text_passes_through() {
        let mut t = TextStream::new(vec![]);
        assert_eq!(t.push(b"Hello"), emit("Hello"));
        assert_eq!(t.push(b" world"), emit(" world"));
        assert_eq!(t.finish(), "");
    }

    #[test]
    fn split_utf8_character_is_sent_once_complete() {
        let euro = "€".as_bytes(); // 3 bytes
        let mut t = TextStream::new(vec![]);
        assert_eq!(t.push(&euro[..1]), emit(""));
        assert_eq!(t.push(&euro[1..2]), emit(""));
        assert_eq!(t.push(&euro[2..]), emit("€"));
        let emoji = "a😀b".as_bytes();
        assert_eq!(t.push(&emoji[..3]), emit("a"));
        assert_eq!(t.push(&emoji[3..]), emit("😀b"));
    }

    #[test]
    fn invalid_bytes_become_replacement_and_do_not_stall() {
        let mut t = TextStream::new(vec![]);
        assert_eq!(t.push(&[b'a', 0xFF, b'b']), emit("a\u{FFFD}b"));
        assert_eq!(t.push(&[0xE2, 0x82]), emit(""));
        assert_eq!(t.finish(), "\u{FFFD}");
    }

    #[test]
    fn stop_string_is_not_sent() {
        let mut t = TextStream::new(vec!["STOP".into()]);
        assert_eq!(t.push(b"one two "), emit("one two "));
        assert_eq!(t.push(b"ST"), emit(""));
        assert_eq!(t.push(b"OP and more"), Step::Stop(String::new()));
    }

    #[test]
    fn held_prefix_is_released_when_it_diverges() {
        let mut t = TextStream::new(vec!["\n\n".into()]);
        assert_eq!(t.push(b"line\n"), emit("line"));
        assert_eq!(t.push(b"next"), emit("\nnext"));
        assert_eq!(t.push(b"\n"), emit(""));
        assert_eq!(t.finish(), "\n");
    }

    #[test]
    fn stop_inside_one_token_keeps_the_text_before_it() {
        let mut t = TextStream::new(vec!["User:".into(), "###".into()]);
        assert_eq!(t.push(b"fine. ### User: hi"), Step::Stop("fine. ".into()));
    }

    #[test]
    fn stop_spanning_many_tokens_and_multibyte() {
        let mut t = TextStream::new(vec!["終わり".into()]);
        let bytes = "はい終わり".as_bytes();
        let mut out = String::new();
        let mut stopped = None;
        for b in bytes {
            match t.push(&[*b]) {
                Step::Emit(s) => out.push_str(&s),
                Step::Stop(s) => {
                    out.push_str(&s);
                    stopped = Some(out.clone());
                    break;
                }
            }
        }
        assert_eq!(stopped.as_deref(), Some("はい"));
    }

    #[test]
    fn overlapping_stop_prefixes() {
        let mut t = TextStream::new(vec!["abc".into(), "bcd".into()]);
        assert_eq!(t.push(b"xab"), emit("x"));
        assert_eq!(t.push(b"cz"), Step::Stop(String::new()));
        let mut t = TextStream::new(vec!["abc".into(), "bcd".into()]);
        assert_eq!(t.push(b"ab"), emit(""));
        assert_eq!(t.push(b"x"), emit("abx"));
    }
}
