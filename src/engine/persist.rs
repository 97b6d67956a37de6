//! Saved prefixes on disk, so that a restart starts warm: one file per cached
//! prefix in the state directory.
//!
//! A file is `ICPREFIX`, a little-endian u32 header length, a JSON header
//! (format version, binding, token count, state size, CRC-32 of the rest), the
//! tokens (i32 LE) and llama.cpp's sequence state. The binding names the model
//! file (size and CRC-32), the llama.cpp build and the context settings: a
//! file whose binding differs, or that is truncated or corrupt, is skipped
//! with a warning and never loaded. Writes go to a temporary file renamed into
//! place; the directory's total is bounded; a full disk is a warning.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::engine::backend::Token;
use crate::engine::snapshot::Prefix;

const MAGIC: &[u8; 8] = b"ICPREFIX";
const VERSION: u32 = 1;
const EXT: &str = "icp";

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    version: u32,
    binding: String,
    tokens: usize,
    state_bytes: usize,
    crc32: u32,
}

/// The state directory, for one binding.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    binding: String,
    max_bytes: usize,
}

/// Writes saves to the state directory on a thread of its own, one at a
/// time, so the engine does not wait for the disk: a 70 MB save took
/// 215-275 ms here, and a request arriving meanwhile waited for it (one
/// request a minute in a steady closed loop). Dropping it waits for the
/// write under way.
#[derive(Default)]
pub struct Writer {
    thread: Option<thread::JoinHandle<()>>,
}

impl Writer {
    /// Writes `prefixes` (copied out of the KV cache in `copied`) once the
    /// previous write is done; on the caller's thread if no thread starts.
    pub fn save(&mut self, store: &Store, prefixes: Vec<Prefix>, copied: Duration) {
        self.finish();
        let job = Arc::new((store.clone(), prefixes));
        let write = move |job: &(Store, Vec<Prefix>)| {
            let (store, prefixes) = job;
            let t0 = Instant::now();
            let bytes: usize = prefixes.iter().map(Prefix::bytes).sum();
            let written = store.save(prefixes);
            log::info!(
                "saved {written} cached prefixes ({:.1} MB) to {} in {:.1} ms ({:.1} ms of it copying on the engine thread)",
                bytes as f64 / 1e6,
                store.dir().display(),
                (copied + t0.elapsed()).as_secs_f64() * 1e3,
                copied.as_secs_f64() * 1e3
            );
        };
        let theirs = job.clone();
        match thread::Builder::new()
            .name("ic-save".into())
            .spawn(move || write(&theirs))
        {
            Ok(handle) => self.thread = Some(handle),
            Err(e) => {
                log::warn!("saving on the engine thread: no thread ({e})");
                write(&job);
            }
        }
    }

    /// Waits for the write under way, if any.
    pub fn finish(&mut self) {
        if let Some(handle) = self.thread.take()
            && handle.join().is_err()
        {
            log::error!("the thread saving cached prefixes panicked");
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Why a file was skipped.
#[derive(Debug, thiserror::Error)]
pub enum Skip {
    #[error("cannot read it: {0}")]
    Io(#[from] io::Error),
    #[error("not a prefix snapshot")]
    Magic,
    #[error("its header is damaged")]
    Header,
    #[error("it was saved for another model, build or settings")]
    Binding,
    #[error("it is truncated or corrupt")]
    Corrupt,
}

impl Store {
    pub fn new(dir: PathBuf, binding: String, max_bytes: usize) -> Store {
        Store {
            dir,
            binding,
            max_bytes,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Every snapshot of this binding, the most recently saved first; others
    /// are skipped with a warning each.
    pub fn load(&self) -> Vec<Prefix> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            if path.extension().and_then(|e| e.to_str()) != Some(EXT) {
                continue;
            }
            let modified = fs::metadata(&path).and_then(|m| m.modified()).ok();
            match fs::read(&path)
                .map_err(Skip::from)
                .and_then(|b| decode(&b, &self.binding))
            {
                Ok(prefix) => found.push((modified, prefix)),
                Err(why) => log::warn!("skipping saved prefix {}: {why}", path.display()),
            }
        }
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        found.into_iter().map(|(_, p)| p).collect()
    }

    /// Replaces the saved prefixes with `prefixes` (the most recent first,
    /// while they fit in the budget). Failures are logged, never fatal.
    pub fn save(&self, prefixes: &[Prefix]) -> usize {
        if let Err(e) = fs::create_dir_all(&self.dir) {
            log::warn!(
                "cannot create the state directory {}: {e}",
                self.dir.display()
            );
            return 0;
        }
        let mut keep = Vec::new();
        let mut used = 0;
        for prefix in prefixes {
            let name = format!(
                "prefix-{:08x}.{EXT}",
                crc32fast::hash(&token_bytes(&prefix.tokens))
            );
            let path = self.dir.join(&name);
            // A file already saved for these tokens is kept, its time renewed
            // (loading goes by it): most saves add a few prefixes to many.
            let written = match self.saved_size(&path, prefix) {
                Some(size) => touch(&path).map(|()| size),
                None => {
                    let bytes = encode(prefix, &self.binding);
                    if used + bytes.len() > self.max_bytes {
                        break;
                    }
                    write_atomic(&path, &bytes).map(|()| bytes.len())
                }
            };
            match written {
                Ok(size) if used + size > self.max_bytes => break,
                Ok(size) => {
                    used += size;
                    keep.push(name);
                }
                Err(e) => {
                    log::warn!("cannot save a prefix in {}: {e}", self.dir.display());
                    break;
                }
            }
        }
        self.remove_others(&keep);
        keep.len()
    }

    /// The size of the file at `path` if it holds `prefix` for this binding
    /// (judged by its header: the name is a hash of the tokens).
    fn saved_size(&self, path: &Path, prefix: &Prefix) -> Option<usize> {
        let mut file = fs::File::open(path).ok()?;
        let size = file.metadata().ok()?.len() as usize;
        let mut head = vec![0u8; size.min(4096)];
        io::Read::read_exact(&mut file, &mut head).ok()?;
        let (header, rest) = split_header(&head).ok()?;
        let body = prefix.tokens.len() * 4 + prefix.state.len();
        (header.version == VERSION
            && header.binding == self.binding
            && header.tokens == prefix.tokens.len()
            && header.state_bytes == prefix.state.len()
            && size == head.len() - rest.len() + body)
            .then_some(size)
    }

    /// Deletes snapshot files not in `keep` (and temporary files left by a crash).
    fn remove_others(&self, keep: &[String]) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let ours = name.ends_with(&format!(".{EXT}")) || name.ends_with(&format!(".{EXT}.tmp"));
            if ours && !keep.iter().any(|k| k == name) {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

fn token_bytes(tokens: &[Token]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn encode(prefix: &Prefix, binding: &str) -> Vec<u8> {
    let body = [
        token_bytes(&prefix.tokens).as_slice(),
        prefix.state.as_slice(),
    ]
    .concat();
    let header = serde_json::to_vec(&Header {
        version: VERSION,
        binding: binding.to_owned(),
        tokens: prefix.tokens.len(),
        state_bytes: prefix.state.len(),
        crc32: crc32fast::hash(&body),
    })
    .expect("a header always serialises");
    let mut out = Vec::with_capacity(12 + header.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&body);
    out
}

/// A file's header and what follows it (all or part of the body).
fn split_header(bytes: &[u8]) -> Result<(Header, &[u8]), Skip> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(Skip::Magic)?;
    let (len, rest) = rest.split_first_chunk::<4>().ok_or(Skip::Header)?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return Err(Skip::Header);
    }
    let (header, body) = rest.split_at(len);
    let header = serde_json::from_slice(header).map_err(|_| Skip::Header)?;
    Ok((header, body))
}

fn decode(bytes: &[u8], binding: &str) -> Result<Prefix, Skip> {
    let (header, body) = split_header(bytes)?;
    if header.version != VERSION || header.binding != binding {
        return Err(Skip::Binding);
    }
    let token_len = header.tokens.checked_mul(4).ok_or(Skip::Corrupt)?;
    if body.len() != token_len + header.state_bytes || crc32fast::hash(body) != header.crc32 {
        return Err(Skip::Corrupt);
    }
    let (tokens, state) = body.split_at(token_len);
    Ok(Prefix {
        tokens: tokens
            .chunks_exact(4)
            .map(|c| Token::from_le_bytes(c.try_into().expect("chunks of 4")))
            .collect(),
        state: Arc::new(state.to_vec()),
    })
}

fn touch(path: &Path) -> io::Result<()> {
    fs::File::options()
        .write(true)
        .open(path)?
        .set_modified(std::time::SystemTime::now())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("{EXT}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ic-persist-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn prefix(seed: i32) -> Prefix {
        Prefix {
            tokens: (0..32).map(|t| t + seed * 100).collect(),
            state: Arc::new(vec![seed as u8; 1000]),
        }
    }

    #[test]
    fn saved_prefixes_come_back_most_recent_first() {
        let store = Store::new(dir("roundtrip"), "model=a".into(), 1 << 20);
        assert!(store.load().is_empty(), "no directory yet");
        assert_eq!(store.save(&[prefix(1), prefix(2)]), 2);
        let loaded = store.load();
        assert_eq!(loaded.len(), 2);
        assert!(loaded.contains(&prefix(1)) && loaded.contains(&prefix(2)));
        // A new save replaces the old set.
        assert_eq!(store.save(&[prefix(3)]), 1);
        assert_eq!(store.load(), [prefix(3)]);
        fs::remove_dir_all(store.dir()).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_prefix_saved_already_is_not_written_again_unless_its_binding_changed() {
        use std::os::unix::fs::MetadataExt;
        let d = dir("unchanged");
        let inode = |store: &Store| {
            let file = fs::read_dir(store.dir()).unwrap().next().unwrap().unwrap();
            file.metadata().unwrap().ino()
        };
        let store = Store::new(d.clone(), "model=a".into(), 1 << 20);
        assert_eq!(store.save(&[prefix(1)]), 1);
        let first = inode(&store);
        assert_eq!(store.save(&[prefix(1)]), 1);
        assert_eq!(inode(&store), first, "kept as it was");
        let other = Store::new(d, "model=b".into(), 1 << 20);
        assert_eq!(other.save(&[prefix(1)]), 1);
        assert_ne!(inode(&other), first, "written for the new binding");
        assert_eq!(other.load(), [prefix(1)]);
        assert!(store.load().is_empty());
        fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn the_writer_saves_in_the_background_one_save_after_the_other() {
        let store = Store::new(dir("writer"), "model=a".into(), 1 << 20);
        let mut writer = Writer::default();
        writer.save(&store, vec![prefix(1), prefix(2)], Duration::ZERO);
        // The second waits for the first, so the last set is what remains.
        writer.save(&store, vec![prefix(3)], Duration::ZERO);
        writer.finish();
        assert_eq!(store.load(), [prefix(3)]);
        writer.save(&store, vec![prefix(4)], Duration::ZERO);
        drop(writer);
        assert_eq!(store.load(), [prefix(4)], "dropping it waits for the write");
        fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn the_budget_bounds_what_is_written() {
        let one = encode(&prefix(1), "b").len();
        let store = Store::new(dir("budget"), "b".into(), one * 2 + 10);
        assert_eq!(store.save(&[prefix(1), prefix(2), prefix(3)]), 2);
        assert_eq!(store.load().len(), 2);
        fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn other_bindings_truncated_files_and_noise_are_skipped() {
        let d = dir("skip");
        let store = Store::new(d.clone(), "model=a".into(), 1 << 20);
        store.save(&[prefix(1)]);
        let good = fs::read_dir(&d).unwrap().next().unwrap().unwrap().path();
        let bytes = fs::read(&good).unwrap();
        fs::write(d.join("truncated.icp"), &bytes[..bytes.len() - 10]).unwrap();
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        fs::write(d.join("flipped.icp"), &flipped).unwrap();
        fs::write(d.join("noise.icp"), b"random bytes, not a snapshot").unwrap();
        fs::write(d.join("empty.icp"), b"").unwrap();
        assert_eq!(store.load(), [prefix(1)], "only the good file");
        let other = Store::new(d.clone(), "model=b".into(), 1 << 20);
        assert!(other.load().is_empty());
        assert!(matches!(decode(&bytes, "model=b"), Err(Skip::Binding)));
        assert!(matches!(decode(&flipped, "model=a"), Err(Skip::Corrupt)));
        assert!(matches!(
            decode(b"ICPREFIX\xff\xff\xff\xff", "model=a"),
            Err(Skip::Header)
        ));
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn an_unwritable_directory_is_a_warning() {
        let store = Store::new(PathBuf::from("/proc/no/such/dir"), "b".into(), 1 << 20);
        assert_eq!(store.save(&[prefix(1)]), 0);
        assert!(store.load().is_empty());
    }
}
