//! One HTTP exchange with an upstream over a non-blocking mio socket:
//! connect, write the request, read the response into its parser, until
//! either side would block (mio is edge-triggered).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Poll, Token};

use super::http::{Response, Target};

/// The upstream's addresses, IPv4 first (`localhost` servers often listen
/// on 127.0.0.1 only).
pub fn resolve(t: &Target) -> io::Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = (t.host.as_str(), t.port).to_socket_addrs()?.collect();
    addrs.sort_by_key(|a| a.is_ipv6());
    if addrs.is_empty() {
        return Err(io::Error::other(format!(
            "{} resolves to no address",
            t.host
        )));
    }
    Ok(addrs)
}

/// One HTTP exchange in progress.
pub struct Conn {
    pub stream: TcpStream,
    out: Vec<u8>,
    /// Request bytes written so far (0: not connected yet).
    pub written: usize,
    pub resp: Response,
    /// When a byte last went either way.
    pub last_io: Instant,
}

/// How reading and writing a connection went.
pub enum Flow {
    Open,
    /// The peer closed its side (EOF).
    Closed,
    Failed(io::Error),
}

impl Conn {
    pub fn open(poll: &Poll, addr: SocketAddr, token: Token, bytes: Vec<u8>) -> io::Result<Conn> {
        let mut stream = TcpStream::connect(addr)?;
        poll.registry()
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Conn {
            stream,
            out: bytes,
            written: 0,
            resp: Response::default(),
            last_io: Instant::now(),
        })
    }

    /// Writes what is left of the request, then reads what has come into
    /// the response, until either would block.
    pub fn drive(&mut self, now: Instant) -> Result<Flow, String> {
        if let Ok(Some(e)) | Err(e) = self.stream.take_error() {
            return Ok(Flow::Failed(e));
        }
        let mut write_error = None;
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(n) => {
                    self.written += n;
                    self.last_io = now;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::NotConnected
                    ) =>
                {
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    write_error = Some(e);
                    break;
                }
            }
        }
        let mut buf = [0u8; 16 * 1024];
        let flow = loop {
            match self.stream.read(&mut buf) {
                Ok(0) => break Flow::Closed,
                Ok(n) => {
                    self.last_io = now;
                    self.resp.feed(&buf[..n]).map_err(|e| e.to_string())?;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::NotConnected
                    ) =>
                {
                    break Flow::Open;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Flow::Failed(e),
            }
        };
        // An upstream may answer (413, say) and close before reading the
        // whole request: a complete answer counts, not the failed write.
        match write_error {
            Some(e) if !self.resp.is_done() => Ok(Flow::Failed(e)),
            _ => Ok(flow),
        }
    }

    pub fn close(mut self, poll: &Poll) {
        let _ = poll.registry().deregister(&mut self.stream);
    }
}
