//! The parent of a differencing VHD: the parent locators and the parent name of the dynamic
//! header, resolved to a file; the parent opened read-only (shared lock) and checked against
//! the unique id the child names.
//!
//! Dynamic header fields used (big-endian): parent unique id at 40 (16 bytes), parent name
//! at 64 (512 bytes of UTF-16BE), eight parent locator entries of 24 bytes from 576: platform
//! code 0, data space 4, data length 8, data offset 16 (bytes from the file's start).

use std::fs::File;
use std::path::{Path, PathBuf};

use super::super::io::pread_all;
use super::super::qcow2::MAX_CHAIN;
use super::super::{in_range, open_in_chain, DiskBackend, DiskError, DiskOptions, Format};
use super::{be32, be64, uuid_string, DYN_HEADER_LEN};

/// Longest locator accepted: a Windows path of 32767 UTF-16 units, and its terminator.
const MAX_LOCATOR_LEN: u32 = 65536;

/// The opened parent of a differencing image.
#[derive(Debug)]
pub(crate) struct Parent {
    pub disk: Box<dyn DiskBackend>,
    /// Which locator (or the parent name) found it, and the name as written there.
    pub found_by: String,
}

/// One place the parent may be: the path, and where the child says so.
#[derive(Debug)]
struct Candidate {
    path: PathBuf,
    what: String,
}

/// Finds, opens and checks the parent of the differencing image at `opts.path` (open as
/// `file`, `len` bytes, dynamic header `h`); `chain` holds the images above.
pub(super) fn open(
    file: &File,
    len: u64,
    h: &[u8; DYN_HEADER_LEN],
    opts: &DiskOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Parent, DiskError> {
    let refused = |reason: String| DiskError::Refused {
        path: opts.path.clone(),
        format: Format::Vhd,
        reason,
    };
    let invalid = |reason: String| DiskError::Invalid {
        path: opts.path.clone(),
        format: Format::Vhd,
        reason,
    };
    let dir = opts.path.parent().unwrap_or(Path::new("")).to_path_buf();
    let candidates = candidates(file, len, h, &dir).map_err(|e| match e {
        LocError::Read(source) => DiskError::Read {
            path: opts.path.clone(),
            source,
        },
        LocError::Bad(m) => invalid(m),
    })?;
    let Some(found) = candidates.iter().find(|c| c.path.exists()) else {
        let tried: Vec<String> = candidates
            .iter()
            .map(|c| format!("{} ({})", c.path.display(), c.what))
            .collect();
        return Err(invalid(if tried.is_empty() {
            "differencing image without a parent locator or parent name".into()
        } else {
            format!("parent image not found (tried {})", tried.join(", "))
        }));
    };
    let me = std::fs::canonicalize(&opts.path).unwrap_or_else(|_| opts.path.clone());
    chain.push(me);
    if chain.len() > MAX_CHAIN {
        return Err(refused(format!(
            "the parent chain is longer than {MAX_CHAIN} images"
        )));
    }
    let canon = std::fs::canonicalize(&found.path).unwrap_or_else(|_| found.path.clone());
    if chain.contains(&canon) {
        return Err(refused(format!(
            "the parent chain loops back to {}",
            canon.display()
        )));
    }
    let popts = DiskOptions {
        path: found.path.clone(),
        readonly: true,
        direct: opts.direct,
        format: Some(Format::Vhd),
    };
    let disk = open_in_chain(&popts, chain).map_err(|e| DiskError::Backing {
        path: opts.path.clone(),
        source: Box::new(e),
    })?;
    chain.pop();
    let want: [u8; 16] = h[40..56].try_into().expect("16 bytes");
    let got = disk.as_vhd().map(|v| v.unique_id()).unwrap_or_default();
    if got != uuid_string(&want) {
        return Err(invalid(format!(
            "the parent {} has unique id {got}, not {} as the child expects (the parent \
             changed, or is another image)",
            found.path.display(),
            uuid_string(&want)
        )));
    }
    Ok(Parent {
        disk,
        found_by: found.what.clone(),
    })
}

enum LocError {
    Read(std::io::Error),
    Bad(String),
}

/// The places the header names, in the order tried: the W2ru, W2ku and MacX locators (in
/// entry order within each kind), then the parent name (as a path, and its file name in the
/// child's folder).
fn candidates(
    file: &File,
    len: u64,
    h: &[u8; DYN_HEADER_LEN],
    dir: &Path,
) -> Result<Vec<Candidate>, LocError> {
    let mut found = Vec::new();
    for code in [b"W2ru", b"W2ku", b"MacX"] {
        for k in 0..8 {
            let e = &h[576 + 24 * k..600 + 24 * k];
            if e[..4] != code[..] {
                continue;
            }
            let code_s = String::from_utf8_lossy(code).into_owned();
            let Some(name) = read_locator(file, len, e, k, &code_s)? else {
                continue;
            };
            let path = match code {
                b"MacX" => resolve(dir, &file_url(&name).map_err(LocError::Bad)?),
                _ => resolve(dir, &windows_path(&name)),
            };
            found.push(Candidate {
                path,
                what: format!("locator {k} {code_s}: {name}"),
            });
        }
    }
    let name = utf16(&h[64..576], u16::from_be_bytes)
        .map_err(|m| LocError::Bad(format!("parent name: {m}")))?;
    if !name.is_empty() {
        let p = windows_path(&name);
        found.push(Candidate {
            path: resolve(dir, &p),
            what: format!("parent name: {name}"),
        });
        if let Some(base) = Path::new(&p).file_name().filter(|b| *b != p.as_str()) {
            found.push(Candidate {
                path: dir.join(base),
                what: format!("parent name's file name: {name}"),
            });
        }
    }
    Ok(found)
}

/// The text of locator entry `e` (number `k`, platform `code`), `None` when it is empty.
fn read_locator(
    file: &File,
    len: u64,
    e: &[u8],
    k: usize,
    code: &str,
) -> Result<Option<String>, LocError> {
    let n = be32(e, 8);
    let at = be64(e, 16);
    if n == 0 {
        return Ok(None);
    }
    let bad = |m: String| LocError::Bad(format!("parent locator {k} ({code}): {m}"));
    if n > MAX_LOCATOR_LEN {
        return Err(bad(format!("{n} bytes (at most {MAX_LOCATOR_LEN})")));
    }
    if !in_range(at, u64::from(n), len) {
        return Err(bad(format!(
            "{n} bytes at {at:#x} lie outside the file ({len} bytes)"
        )));
    }
    let mut raw = vec![0u8; n as usize];
    pread_all(file, &mut raw, at).map_err(LocError::Read)?;
    let text = if code == "MacX" {
        let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
        String::from_utf8(raw[..end].to_vec()).map_err(|_| bad("not UTF-8".into()))?
    } else {
        utf16(&raw, u16::from_le_bytes).map_err(bad)?
    };
    Ok((!text.is_empty()).then_some(text))
}

/// UTF-16 text (of the given byte order) up to its first NUL.
fn utf16(raw: &[u8], unit: fn([u8; 2]) -> u16) -> Result<String, String> {
    if raw.len() % 2 != 0 {
        return Err(format!("{} bytes of UTF-16 (an odd number)", raw.len()));
    }
    let units: Vec<u16> = raw
        .chunks_exact(2)
        .map(|c| unit([c[0], c[1]]))
        .take_while(|u| *u != 0)
        .collect();
    String::from_utf16(&units).map_err(|_| "not valid UTF-16".into())
}

/// A Windows path as a Unix one: backslashes become slashes, a drive letter goes
/// (`C:\vms\a.vhd` is `/vms/a.vhd`), `.\a.vhd` stays relative.
fn windows_path(s: &str) -> String {
    let s = s.replace('\\', "/");
    let b = s.as_bytes();
    if b.len() >= 2 && b[1] == b':' && b[0].is_ascii_alphabetic() {
        return s[2..].to_string();
    }
    s
}

/// The path of a `file://` URL (host empty or `localhost`; %XX escapes decoded).
fn file_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("file://")
        .ok_or_else(|| format!("MacX locator `{url}` is not a file:// URL"))?;
    let rest = rest.strip_prefix("localhost").unwrap_or(rest);
    let mut out = Vec::with_capacity(rest.len());
    let b = rest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("MacX locator `{url}` decodes to non-UTF-8"))
}

/// A relative path resolves against the child's folder (as Hyper-V and qemu do).
fn resolve(dir: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    }
}
