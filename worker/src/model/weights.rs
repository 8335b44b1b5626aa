//! Memory-mapped safetensors checkpoints (single file, sharded with an index, or a bare set of
//! files), read tensor by tensor into f32.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::{SafeTensorError, SafeTensors};
use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum WeightsError {
    #[error("no model.safetensors, model.safetensors.index.json or *.safetensors in {dir}")]
    NoFiles { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {source}")]
    Index {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} is not a valid safetensors file: {source}")]
    Format {
        path: PathBuf,
        source: SafeTensorError,
    },
    #[error("{index} maps tensor {name} to {path}, which does not contain it")]
    MissingFromShard {
        name: String,
        index: PathBuf,
        path: PathBuf,
    },
    #[error("tensor {name} is stored twice, in {first} and {second}")]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("tensor {name} not found in the checkpoint in {dir}")]
    NotFound { name: String, dir: PathBuf },
    #[error("tensor {name} in {path} has dtype {dtype:?}; only F32, F16 and BF16 are supported")]
    UnsupportedDtype {
        name: String,
        path: PathBuf,
        dtype: Dtype,
    },
}

/// A dense row-major f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor2 {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Where tensor data starts in the file: the 8-byte length plus the JSON header.
    data_start: usize,
    metadata: Metadata,
}

pub struct Weights {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name to index into `shards`.
    locations: BTreeMap<String, usize>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// Elements converted per step: large enough for SIMD, small enough for the stack.
const CHUNK: usize = 4096;

impl Weights {
    pub fn open(dir: &Path) -> Result<Self, WeightsError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| WeightsError::Io { path, source }
        };
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let (files, index) = if single.is_file() {
            (vec![single], None)
        } else if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(io(&index_path))?;
            let index: ShardIndex =
                serde_json::from_str(&text).map_err(|source| WeightsError::Index {
                    path: index_path.clone(),
                    source,
                })?;
            let mut files: Vec<PathBuf> = index.weight_map.values().map(|f| dir.join(f)).collect();
            files.sort();
            files.dedup();
            (files, Some(index))
        } else {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(dir).map_err(io(dir))? {
                let path = entry.map_err(io(dir))?.path();
                if path.extension().is_some_and(|e| e == "safetensors") {
                    files.push(path);
                }
            }
            files.sort();
            (files, None)
        };
        if files.is_empty() {
            return Err(WeightsError::NoFiles {
                dir: dir.to_path_buf(),
            });
        }

        let mut shards = Vec::with_capacity(files.len());
        let mut locations = BTreeMap::new();
        for path in files {
            let file = File::open(&path).map_err(io(&path))?;
            // SAFETY: the mapping is read-only and model files are not modified while served;
            // safetensors validates every tensor's byte range against the mapping's length.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io(&path))?;
            let (header_len, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|source| WeightsError::Format {
                    path: path.clone(),
                    source,
                })?;
            let shard_idx = shards.len();
            for name in metadata.offset_keys() {
                if let Some(&first) = locations.get(&name) {
                    let first: &Shard = &shards[first];
                    return Err(WeightsError::Duplicate {
                        name,
                        first: first.path.clone(),
                        second: path,
                    });
                }
                locations.insert(name, shard_idx);
            }
            shards.push(Shard {
                path,
                mmap,
                data_start: 8 + header_len,
                metadata,
            });
        }

        if let Some(index) = index {
            for (name, file) in index.weight_map {
                let path = dir.join(file);
                let found = locations.get(&name).map(|&s| &shards[s].path);
                if found != Some(&path) {
                    return Err(WeightsError::MissingFromShard {
                        name,
                        index: index_path,
                        path,
                    });
                }
            }
        }

        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            locations,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.locations.contains_key(name)
    }

    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.locations.keys().map(String::as_str)
    }

    /// Reads one tensor, converting F16 and BF16 to f32.
    pub fn get_f32(&self, name: &str) -> Result<Tensor2, WeightsError> {
        let shard = self
            .locations
            .get(name)
            .map(|&s| &self.shards[s])
            .ok_or_else(|| WeightsError::NotFound {
                name: name.to_string(),
                dir: self.dir.clone(),
            })?;
        let info = shard
            .metadata
            .info(name)
            .expect("locations only lists tensors of the shard's header");
        let (start, end) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
        let mut data = vec![0f32; info.shape.iter().product()];
        match info.dtype {
            Dtype::F32 => {
                for (dst, src) in data.iter_mut().zip(bytes.chunks_exact(4)) {
                    *dst = f32::from_le_bytes(src.try_into().expect("chunk of 4 bytes"));
                }
            }
            Dtype::F16 => convert_16bit(bytes, &mut data, |bits: &[u16], dst| {
                bits.reinterpret_cast::<f16>().convert_to_f32_slice(dst)
            }),
            Dtype::BF16 => convert_16bit(bytes, &mut data, |bits: &[u16], dst| {
                bits.reinterpret_cast::<bf16>().convert_to_f32_slice(dst)
            }),
            dtype => {
                return Err(WeightsError::UnsupportedDtype {
                    name: name.to_string(),
                    path: shard.path.clone(),
                    dtype,
                });
            }
        }
        Ok(Tensor2 {
            shape: info.shape.clone(),
            data,
        })
    }
}

/// Converts little-endian 16-bit floats chunk by chunk: the mapped bytes need not be 2-byte
/// aligned, so they are first copied into an aligned stack buffer.
fn convert_16bit(bytes: &[u8], out: &mut [f32], convert: impl Fn(&[u16], &mut [f32])) {
    let mut bits = [0u16; CHUNK];
    for (src, dst) in bytes.chunks(2 * CHUNK).zip(out.chunks_mut(CHUNK)) {
        let bits = &mut bits[..dst.len()];
        for (b, pair) in bits.iter_mut().zip(src.chunks_exact(2)) {
            *b = u16::from_le_bytes([pair[0], pair[1]]);
        }
        convert(bits, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// Values exactly representable in f16 and bf16, so every dtype round-trips exactly.
    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i % 61) as f32 - 30.0) * 0.25).collect()
    }

    fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
        match dtype {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::BF16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::I32 => values
                .iter()
                .flat_map(|&v| (v as i32).to_le_bytes())
                .collect(),
            _ => unreachable!("no test writes {dtype:?}"),
        }
    }

    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) {
        let bytes: Vec<(String, Vec<u8>)> = tensors
            .iter()
            .map(|(name, dtype, _, v)| (name.to_string(), encode(*dtype, v)))
            .collect();
        let views = tensors
            .iter()
            .zip(&bytes)
            .map(|((_, dtype, shape, _), (name, b))| {
                (
                    name.clone(),
                    TensorView::new(*dtype, shape.clone(), b).unwrap(),
                )
            });
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    #[test]
    fn reads_all_three_dtypes_from_one_file() {
        let dir = tempfile::tempdir().unwrap();
        // 3 x 5000 crosses a conversion chunk boundary.
        write(
            &dir.path().join("model.safetensors"),
            &[
                ("a.f32", Dtype::F32, vec![2, 3], values(6)),
                ("b.f16", Dtype::F16, vec![3, 5000], values(15000)),
                ("c.bf16", Dtype::BF16, vec![7], values(7)),
                ("d.i32", Dtype::I32, vec![1], vec![0.0]),
            ],
        );
        let w = Weights::open(dir.path()).unwrap();
        assert_eq!(
            w.names().collect::<Vec<_>>(),
            ["a.f32", "b.f16", "c.bf16", "d.i32"]
        );
        assert!(w.contains("b.f16") && !w.contains("nope"));
        for (name, shape, n) in [
            ("a.f32", vec![2, 3], 6),
            ("b.f16", vec![3, 5000], 15000),
            ("c.bf16", vec![7], 7),
        ] {
            let t = w.get_f32(name).unwrap();
            assert!(
                t == Tensor2 {
                    shape,
                    data: values(n)
                },
                "{name}"
            );
        }
        let err = w.get_f32("d.i32").unwrap_err().to_string();
        assert!(err.contains("d.i32") && err.contains("model.safetensors") && err.contains("I32"));
        let err = w.get_f32("nope").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn converts_non_exact_values_like_half() {
        let dir = tempfile::tempdir().unwrap();
        let v = vec![0.1f32, -3.3e-3, 65504.0, 1.0e-7, std::f32::consts::PI];
        write(
            &dir.path().join("model.safetensors"),
            &[
                ("h", Dtype::F16, vec![5], v.clone()),
                ("b", Dtype::BF16, vec![5], v.clone()),
            ],
        );
        let w = Weights::open(dir.path()).unwrap();
        let h: Vec<f32> = v.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        let b: Vec<f32> = v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        assert_eq!(w.get_f32("h").unwrap().data, h);
        assert_eq!(w.get_f32("b").unwrap().data, b);
    }

    #[test]
    fn reads_sharded_checkpoint_through_index() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("model-00001-of-00002.safetensors"),
            &[
                ("x", Dtype::BF16, vec![4], values(4)),
                ("y", Dtype::F32, vec![2], values(2)),
            ],
        );
        write(
            &dir.path().join("model-00002-of-00002.safetensors"),
            &[("z", Dtype::F16, vec![2, 2], values(4))],
        );
        let index = serde_json::json!({
            "metadata": {"total_size": 28},
            "weight_map": {
                "x": "model-00001-of-00002.safetensors",
                "y": "model-00001-of-00002.safetensors",
                "z": "model-00002-of-00002.safetensors"
            }
        });
        let index_path = dir.path().join("model.safetensors.index.json");
        std::fs::write(&index_path, index.to_string()).unwrap();
        let w = Weights::open(dir.path()).unwrap();
        assert_eq!(w.names().collect::<Vec<_>>(), ["x", "y", "z"]);
        assert_eq!(w.get_f32("z").unwrap().shape, [2, 2]);
        assert_eq!(w.get_f32("x").unwrap().data, values(4));

        // An index that points a tensor at the wrong shard is refused, naming both.
        let mut wrong = index.clone();
        wrong["weight_map"]["z"] = "model-00001-of-00002.safetensors".into();
        std::fs::write(&index_path, wrong.to_string()).unwrap();
        let err = Weights::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("tensor z") && err.contains("model-00001-of-00002"),
            "{err}"
        );

        // Without the index every *.safetensors file is read.
        std::fs::remove_file(&index_path).unwrap();
        assert_eq!(Weights::open(dir.path()).unwrap().names().count(), 3);
    }

    #[test]
    fn refuses_duplicates_empty_dirs_and_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let err = Weights::open(dir.path()).err().unwrap();
        assert!(matches!(err, WeightsError::NoFiles { .. }));

        write(
            &dir.path().join("a.safetensors"),
            &[("t", Dtype::F32, vec![1], vec![1.0])],
        );
        write(
            &dir.path().join("b.safetensors"),
            &[("t", Dtype::F32, vec![1], vec![2.0])],
        );
        let err = Weights::open(dir.path()).err().unwrap();
        assert!(matches!(err, WeightsError::Duplicate { ref name, .. } if name == "t"));

        std::fs::write(
            dir.path().join("model.safetensors"),
            b"not a safetensors file",
        )
        .unwrap();
        let err = Weights::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }
}
