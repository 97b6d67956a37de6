//! `n_gpu_layers = "auto"`: how many layers fit in VRAM (split computing).
//!
//! The plan is sans-I/O: per-layer weight sizes read from the GGUF's tensor
//! table (`read_gguf`), the KV cache for the configured context, an estimate
//! of llama.cpp's compute buffer and a safety margin, against free VRAM
//! (NVML) capped by `vram_budget_mb`. llama.cpp offloads the *last*
//! `n_gpu_layers` blocks (and the output layer once every block is there),
//! so the plan fills from the last block backwards. CPU-only builds skip it.

use std::io::{self, Read};
use std::path::Path;

use crate::config::{Config, GpuLayers};

const MB: u64 = 1024 * 1024;

/// What the planner needs to know about a model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelInfo {
    /// Weight bytes of each repeating block `blk.N.*`.
    pub layer_bytes: Vec<u64>,
    /// Weight bytes of the output layer (`output.weight`, `output_norm.weight`).
    pub output_bytes: u64,
    pub n_embd: u64,
    pub n_vocab: u64,
    /// K plus V width per layer (key_length × head_count_kv + value_length × head_count_kv).
    pub kv_width: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The value for llama.cpp's n_gpu_layers (blocks, plus one for the output layer).
    pub n_gpu_layers: i32,
    pub blocks_on_gpu: usize,
    pub blocks_total: usize,
    pub weights_mb: u64,
    pub kv_mb: u64,
    pub compute_mb: u64,
    pub margin_mb: u64,
    /// Unplanned VRAM left over, beyond the margin.
    pub left_mb: u64,
}

/// Plans the split for `available` bytes of VRAM.
pub fn plan(info: &ModelInfo, n_ctx: u64, n_batch: u64, available: u64) -> Plan {
    // f16 K and V cells for every context position.
    let kv_per_layer = n_ctx * info.kv_width * 2;
    // llama.cpp reserves its compute graph for a full batch: activations plus
    // the logits. An estimate, on the generous side.
    let compute = n_batch * (info.n_vocab + 8 * info.n_embd) * 4;
    let margin = (available / 20).max(256 * MB);
    let mut left = available.saturating_sub(compute + margin);
    let (mut weights, mut kv, mut blocks) = (0, 0, 0);
    for &layer in info.layer_bytes.iter().rev() {
        let cost = layer + kv_per_layer;
        if cost > left {
            break;
        }
        left -= cost;
        weights += layer;
        kv += kv_per_layer;
        blocks += 1;
    }
    let mut n_gpu_layers = blocks as i32;
    if blocks == info.layer_bytes.len() && info.output_bytes <= left {
        left -= info.output_bytes;
        weights += info.output_bytes;
        n_gpu_layers += 1;
    }
    let compute_mb = if blocks > 0 { compute / MB } else { 0 };
    if blocks == 0 {
        left = available.saturating_sub(margin);
    }
    Plan {
        n_gpu_layers,
        blocks_on_gpu: blocks,
        blocks_total: info.layer_bytes.len(),
        weights_mb: weights / MB,
        kv_mb: kv / MB,
        compute_mb,
        margin_mb: margin / MB,
        left_mb: left / MB,
    }
}

/// The `n_gpu_layers` to load with; plans (and logs the plan) for `"auto"`.
pub fn gpu_layers(config: &Config) -> i32 {
    match config.model.n_gpu_layers {
        GpuLayers::Count(n) => n,
        GpuLayers::Auto if !cfg!(feature = "cuda") => {
            log::info!(
                "n_gpu_layers = \"auto\": this build has no GPU support (cargo feature `cuda`): every layer stays on the CPU"
            );
            0
        }
        GpuLayers::Auto => auto(config).unwrap_or_else(|why| {
            log::warn!("n_gpu_layers = \"auto\": {why}: every layer stays on the CPU");
            0
        }),
    }
}

fn auto(config: &Config) -> Result<i32, String> {
    let free = crate::ops::monitor::gpu_free_vram_mb()
        .ok_or("NVML cannot tell the free VRAM (is the NVIDIA driver installed?)")?;
    let budget = match config.model.vram_budget_mb {
        0 => free,
        b => b.min(free),
    };
    let path = config.model_path();
    let info = read_gguf(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let p = plan(
        &info,
        u64::from(config.model.ctx_size),
        u64::from(config.model.batch_size),
        budget * MB,
    );
    log::info!(
        "VRAM plan: {} of {} blocks on the GPU{} (n_gpu_layers = {}): weights {} MB, KV {} MB, compute ~{} MB, margin {} MB, {} MB left of a {} MB budget ({} MB free)",
        p.blocks_on_gpu,
        p.blocks_total,
        if p.n_gpu_layers as usize > p.blocks_on_gpu {
            " plus the output layer"
        } else {
            ""
        },
        p.n_gpu_layers,
        p.weights_mb,
        p.kv_mb,
        p.compute_mb,
        p.margin_mb,
        p.left_mb,
        budget,
        free
    );
    Ok(p.n_gpu_layers)
}

/// Reads the sizes the planner needs from a GGUF file's header and tensor table.
pub fn read_gguf(path: &Path) -> io::Result<ModelInfo> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    parse_gguf(io::BufReader::new(file), len)
}

#[derive(Debug)]
enum Value {
    Int(u64),
    Str(String),
    /// Arrays: their length and, for integers, the largest element.
    Array(u64, Option<u64>),
    Other,
}

fn bad(m: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.into())
}

struct Reader<R> {
    r: R,
    pos: u64,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut b = [0; N];
        self.r.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> io::Result<String> {
        let n = self.u64()?;
        if n > 1 << 24 {
            return Err(bad("string too long"));
        }
        let mut b = vec![0; n as usize];
        self.r.read_exact(&mut b)?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    /// A scalar of GGUF type `t`, as an integer when it is one.
    fn scalar(&mut self, t: u32) -> io::Result<Value> {
        Ok(match t {
            0 | 1 | 7 => Value::Int(u64::from(self.bytes::<1>()?[0])),
            2 | 3 => Value::Int(u64::from(u16::from_le_bytes(self.bytes()?))),
            4 | 5 => Value::Int(u64::from(self.u32()?)),
            10 | 11 => Value::Int(self.u64()?),
            6 => {
                self.u32()?;
                Value::Other
            }
            12 => {
                self.u64()?;
                Value::Other
            }
            8 => Value::Str(self.string()?),
            _ => return Err(bad(format!("unknown GGUF value type {t}"))),
        })
    }
    fn value(&mut self, t: u32) -> io::Result<Value> {
        if t != 9 {
            return self.scalar(t);
        }
        let (et, n) = (self.u32()?, self.u64()?);
        let mut max = None;
        for _ in 0..n {
            if let Value::Int(v) = self.value(et)? {
                max = Some(max.map_or(v, |m: u64| m.max(v)));
            }
        }
        Ok(Value::Array(n, max))
    }
}

fn parse_gguf(r: impl Read, file_len: u64) -> io::Result<ModelInfo> {
    let mut r = Reader { r, pos: 0 };
    if &r.bytes::<4>()? != b"GGUF" {
        return Err(bad("not a GGUF file"));
    }
    let version = r.u32()?;
    if version < 2 {
        return Err(bad(format!("GGUF version {version} is not supported")));
    }
    let (n_tensors, n_kv) = (r.u64()?, r.u64()?);
    let mut kv = std::collections::HashMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let t = r.u32()?;
        kv.insert(key, r.value(t)?);
    }
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let name = r.string()?;
        let dims = r.u32()?;
        for _ in 0..dims {
            r.u64()?;
        }
        r.u32()?;
        tensors.push((r.u64()?, name));
    }
    let int = |k: &str| match kv.get(k) {
        Some(Value::Int(v)) => Some(*v),
        Some(Value::Array(_, max)) => *max,
        _ => None,
    };
    let align = int("general.alignment").unwrap_or(32).max(1);
    let data = r.pos.div_ceil(align) * align;
    let arch = match kv.get("general.architecture") {
        Some(Value::Str(a)) => a.clone(),
        _ => return Err(bad("no general.architecture")),
    };
    let key = |k: &str| int(&format!("{arch}.{k}"));
    let n_layers = key("block_count").ok_or_else(|| bad("no block_count"))? as usize;
    let n_embd = key("embedding_length").unwrap_or(0);
    let heads = key("attention.head_count").unwrap_or(1).max(1);
    let heads_kv = key("attention.head_count_kv").unwrap_or(heads);
    let k_len = key("attention.key_length").unwrap_or(n_embd / heads);
    let v_len = key("attention.value_length").unwrap_or(n_embd / heads);
    let n_vocab = key("vocab_size").unwrap_or(match kv.get("tokenizer.ggml.tokens") {
        Some(Value::Array(n, _)) => *n,
        _ => 0,
    });
    // Tensors lie in the data section in offset order: each one's size is
    // the distance to the next (alignment padding included).
    tensors.sort();
    let data_len = file_len.saturating_sub(data);
    let mut info = ModelInfo {
        layer_bytes: vec![0; n_layers],
        n_embd,
        n_vocab,
        kv_width: (k_len + v_len) * heads_kv,
        ..ModelInfo::default()
    };
    for (i, (offset, name)) in tensors.iter().enumerate() {
        let end = tensors.get(i + 1).map_or(data_len, |t| t.0);
        let size = end.saturating_sub(*offset);
        if let Some(layer) = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
        {
            if let Some(b) = info.layer_bytes.get_mut(layer) {
                *b += size;
            }
        } else if name.starts_with("output") {
            info.output_bytes += size;
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(layers: usize, layer_mb: u64) -> ModelInfo {
        ModelInfo {
            layer_bytes: vec![layer_mb * MB; layers],
            output_bytes: 100 * MB,
            n_embd: 2048,
            n_vocab: 32000,
            kv_width: 2 * 256 * 8,
        }
    }

    #[test]
    fn everything_fits_on_a_big_card() {
        let p = plan(&model(24, 50), 4096, 512, 24 * 1024 * MB);
        assert_eq!(p.blocks_on_gpu, 24);
        assert_eq!(p.n_gpu_layers, 25, "the output layer goes too");
        assert_eq!(p.weights_mb, 24 * 50 + 100);
        assert_eq!(p.kv_mb, 24 * 32);
    }

    #[test]
    fn a_3gb_budget_takes_what_fits_from_the_last_block() {
        // 32 blocks of 100 MB + 32 MB KV each; compute ~ 94 MB, margin 256 MB.
        let p = plan(&model(32, 100), 4096, 512, 3072 * MB);
        let used = p.weights_mb + p.kv_mb + p.compute_mb + p.margin_mb + p.left_mb;
        assert!(used <= 3072, "{p:?}");
        assert_eq!(p.blocks_on_gpu, 20, "{p:?}");
        assert_eq!(p.n_gpu_layers, 20);
        assert!(p.left_mb < 132, "another block would have fitted: {p:?}");
    }

    #[test]
    fn nothing_fits_in_less_than_the_margin() {
        let p = plan(&model(8, 10), 2048, 512, 200 * MB);
        assert_eq!((p.n_gpu_layers, p.compute_mb, p.kv_mb), (0, 0, 0));
    }

    /// A synthetic GGUF: header, metadata and a tensor table, no real weights.
    fn gguf() -> Vec<u8> {
        let mut b = Vec::new();
        let s = |b: &mut Vec<u8>, t: &str| {
            b.extend((t.len() as u64).to_le_bytes());
            b.extend(t.as_bytes());
        };
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend(4u64.to_le_bytes()); // tensors
        b.extend(5u64.to_le_bytes()); // metadata
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "toy");
        s(&mut b, "toy.block_count");
        b.extend(4u32.to_le_bytes());
        b.extend(2u32.to_le_bytes());
        s(&mut b, "toy.embedding_length");
        b.extend(4u32.to_le_bytes());
        b.extend(64u32.to_le_bytes());
        s(&mut b, "toy.attention.head_count");
        b.extend(4u32.to_le_bytes());
        b.extend(4u32.to_le_bytes());
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(3u64.to_le_bytes());
        for t in ["a", "b", "c"] {
            s(&mut b, t);
        }
        for (name, offset) in [
            ("token_embd.weight", 0u64),
            ("blk.0.attn_q.weight", 1000),
            ("blk.1.attn_q.weight", 1600),
            ("output.weight", 2600),
        ] {
            s(&mut b, name);
            b.extend(1u32.to_le_bytes());
            b.extend(10u64.to_le_bytes());
            b.extend(0u32.to_le_bytes());
            b.extend(offset.to_le_bytes());
        }
        b
    }

    #[test]
    fn reads_layer_sizes_from_the_tensor_table() {
        let header = gguf();
        let data_start = (header.len() as u64).div_ceil(32) * 32;
        let info = parse_gguf(&header[..], data_start + 3000).unwrap();
        assert_eq!(info.layer_bytes, vec![600, 1000]);
        assert_eq!(info.output_bytes, 400);
        assert_eq!((info.n_embd, info.n_vocab), (64, 3));
        assert_eq!(info.kv_width, 2 * 16 * 4);
        assert!(parse_gguf(&b"GGML...."[..], 8).is_err());
    }

    #[test]
    fn reads_the_default_model_when_cached() {
        let path = crate::config::model_cache_dir().join(crate::config::DEFAULT_MODEL_FILE);
        if !path.exists() {
            return;
        }
        let info = read_gguf(&path).unwrap();
        assert_eq!(info.layer_bytes.len(), 18, "Gemma 3 270M has 18 blocks");
        assert!(info.layer_bytes.iter().all(|&b| b > 100_000));
        assert!(info.n_vocab > 200_000);
    }
}
