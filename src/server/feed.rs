//! The WebSocket frame path of an open connection, driven from a byte slice
//! instead of a socket: what the reactor does when a client's frames arrive.
//! The property tests below and the coverage-guided target in `fuzz/` use
//! this entry point.

use std::io::{self, Read, Write};

use tungstenite::WebSocket;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::server::connection::{Input, Liveness, ReadEnd, fail, read_messages};

/// An in-memory stream for `feed`: reads the given bytes, then `WouldBlock`
/// (like a non-blocking socket with nothing more to read); keeps what is written.
struct Memory<'a> {
    input: &'a [u8],
    output: Vec<u8>,
    /// Cap on `output`, so a fuzz input cannot make the harness grow without bound.
    limit: usize,
}

impl Read for Memory<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Memory<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.output.len() >= self.limit {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.limit - self.output.len());
        self.output.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What `feed` observed.
#[derive(Debug)]
pub struct Fed {
    pub inputs: Vec<Input>,
    pub liveness: Liveness,
    /// Bytes the server wrote back (echoes, pongs, close frames).
    pub output: Vec<u8>,
}

/// The frame path of an open server-side WebSocket, driven from bytes: what
/// the reactor does when a client's frames arrive, without a socket.
pub fn feed(bytes: &[u8], config: &WebSocketConfig, echo: bool) -> Fed {
    let memory = Memory {
        input: bytes,
        output: Vec::new(),
        limit: 4 * bytes.len() + 1024,
    };
    let mut ws = WebSocket::from_raw_socket(memory, Role::Server, Some(*config));
    let mut inputs = Vec::new();
    // The reactor comes back for more on its next turn; here at once.
    let liveness = loop {
        match read_messages(&mut ws, echo, &mut inputs).0 {
            ReadEnd::More => {}
            ReadEnd::Alive => break Liveness::Alive,
            ReadEnd::Gone => break Liveness::Gone,
            ReadEnd::Fail(code, why) => {
                fail(&mut ws, code, &why);
                break Liveness::Gone;
            }
        }
    };
    let _ = ws.flush();
    Fed {
        inputs,
        liveness,
        output: std::mem::take(&mut ws.get_mut().output),
    }
}

#[cfg(test)]
mod tests {
    //! Property tests of the frame path through `feed`: whatever bytes a
    //! client sends, the server neither panics nor answers without bound, and
    //! well-formed traffic comes out exactly as sent.

    use super::*;
    use proptest::prelude::*;

    fn config() -> WebSocketConfig {
        WebSocketConfig::default()
            .max_message_size(Some(64 * 1024))
            .max_frame_size(Some(16 * 1024))
    }

    /// One client frame: masked, as RFC 6455 requires of clients.
    fn frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// A text message split into `parts` fragments, with a ping after the first.
    fn message(text: &str, parts: usize, mask: [u8; 4]) -> Vec<u8> {
        let bytes = text.as_bytes();
        let size = bytes.len().div_ceil(parts.max(1)).max(1);
        let chunks: Vec<&[u8]> = if bytes.is_empty() {
            vec![&[]]
        } else {
            bytes.chunks(size).collect()
        };
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let opcode = if i == 0 { 0x1 } else { 0x0 };
            out.extend(frame(i + 1 == chunks.len(), opcode, chunk, mask));
            if i == 0 {
                out.extend(frame(true, 0x9, b"hi", mask));
            }
        }
        out
    }

    fn texts(inputs: &[Input]) -> Vec<String> {
        inputs
            .iter()
            .filter_map(|i| match i {
                Input::Text(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_the_answer_is_bounded(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            echo in any::<bool>(),
        ) {
            let fed = feed(&bytes, &config(), echo);
            prop_assert!(fed.output.len() <= 4 * bytes.len() + 1024);
            if !echo {
                // Nothing reaches the reactor that was not a whole, valid message.
                prop_assert!(fed.inputs.len() <= bytes.len() / 6 + 1);
            }
        }

        #[test]
        fn well_formed_messages_come_out_exactly_as_sent(
            msgs in proptest::collection::vec(("\\PC{0,300}", 1usize..5), 1..6),
            mask in any::<[u8; 4]>(),
        ) {
            let mut bytes = Vec::new();
            for (text, parts) in &msgs {
                bytes.extend(message(text, *parts, mask));
            }
            let fed = feed(&bytes, &config(), false);
            prop_assert_eq!(fed.liveness, Liveness::Alive);
            let sent: Vec<String> = msgs.iter().map(|(t, _)| t.clone()).collect();
            prop_assert_eq!(texts(&fed.inputs), sent);
            // Every ping was answered with a pong carrying its payload.
            let pong = [0x8a, 2, b'h', b'i'];
            let pongs = fed.output.windows(4).filter(|w| *w == pong).count();
            prop_assert_eq!(pongs, msgs.len());
        }

        #[test]
        fn the_echo_route_sends_every_message_back(
            msgs in proptest::collection::vec("\\PC{1,200}", 1..6),
            mask in any::<[u8; 4]>(),
        ) {
            let mut bytes = Vec::new();
            for text in &msgs {
                bytes.extend(message(text, 2, mask));
            }
            let fed = feed(&bytes, &config(), true);
            prop_assert_eq!(fed.liveness, Liveness::Alive);
            prop_assert!(fed.inputs.is_empty());
            // Server frames are unmasked: each echo holds the text verbatim,
            // next to the pong of the ping sent after its first fragment.
            let pong = [0x8a, 2, b'h', b'i'];
            let mut expected = Vec::new();
            for text in &msgs {
                if text.len() == 1 {
                    // One fragment: the message is whole before the ping arrives.
                    expected.extend(message_unmasked(text));
                    expected.extend(pong);
                } else {
                    expected.extend(pong);
                    expected.extend(message_unmasked(text));
                }
            }
            prop_assert_eq!(fed.output, expected);
        }

        #[test]
        fn a_corrupted_stream_is_failed_with_a_close_frame_or_read_on(
            msgs in proptest::collection::vec("\\PC{0,100}", 1..4),
            mask in any::<[u8; 4]>(),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let mut bytes = Vec::new();
            for text in &msgs {
                bytes.extend(message(text, 2, mask));
            }
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
            let fed = feed(&bytes, &config(), false);
            if fed.liveness == Liveness::Gone {
                // Failing the connection always says why, with a close frame.
                // (a byte flipped into a close opcode gets its close answered).
                prop_assert!(close_code(&fed.output).is_some(), "no close frame");
            }
        }
    }

    /// The code of the close frame among the server's (unmasked) frames.
    fn close_code(mut out: &[u8]) -> Option<u16> {
        while out.len() >= 2 {
            let opcode = out[0] & 0x0f;
            let (len, head) = match out[1] & 0x7f {
                126 => (u16::from_be_bytes([out[2], out[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            let payload = &out[head..head + len];
            if opcode == 0x8 {
                return Some(match payload {
                    [a, b, ..] => u16::from_be_bytes([*a, *b]),
                    _ => 1005,
                });
            }
            out = &out[head + len..];
        }
        None
    }

    fn message_unmasked(text: &str) -> Vec<u8> {
        let mut out = vec![0x81];
        let n = text.len();
        if n < 126 {
            out.push(n as u8);
        } else {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        out.extend_from_slice(text.as_bytes());
        out
    }

    #[test]
    fn invalid_utf8_in_a_fragmented_text_message_is_closed_with_1007() {
        let mask = [1, 2, 3, 4];
        let mut bytes = frame(false, 0x1, "caf".as_bytes(), mask);
        bytes.extend(frame(true, 0x0, &[0xc3, 0x28], mask));
        let fed = feed(&bytes, &config(), true);
        assert_eq!(fed.liveness, Liveness::Gone);
        assert_eq!(close_code(&fed.output), Some(1007));
    }

    #[test]
    fn one_turn_reads_at_most_messages_per_turn_and_the_next_goes_on() {
        let bytes: Vec<u8> = (0..100)
            .flat_map(|i| frame(true, 0x1, format!("m{i}").as_bytes(), [5, 6, 7, 8]))
            .collect();
        let memory = Memory {
            input: &bytes,
            output: Vec::new(),
            limit: 1 << 20,
        };
        let mut ws = WebSocket::from_raw_socket(memory, Role::Server, Some(config()));
        let mut inputs = Vec::new();
        let (end, _) = read_messages(&mut ws, false, &mut inputs);
        assert!(matches!(end, ReadEnd::More));
        assert_eq!(inputs.len(), crate::server::connection::MESSAGES_PER_TURN);
        let (end, _) = read_messages(&mut ws, false, &mut inputs);
        assert!(matches!(end, ReadEnd::Alive));
        let want: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
        assert_eq!(texts(&inputs), want);
    }

    #[test]
    fn a_message_over_the_limit_is_closed_with_1009() {
        let big = "x".repeat(20 * 1024);
        let bytes = frame(true, 0x1, big.as_bytes(), [9, 9, 9, 9]);
        let fed = feed(&bytes, &config(), false);
        assert_eq!(fed.liveness, Liveness::Gone);
        assert_eq!(close_code(&fed.output), Some(1009));
    }
}
