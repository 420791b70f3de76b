//! The qcow2 header (versions 2 and 3) and its extensions: parsing with every field checked
//! against the file it came from, and serialising for new images and header updates.
//!
//! All fields are big-endian. Layout (offsets in bytes): magic 0, version 4, backing file
//! offset 8 and size 16, cluster_bits 20, virtual size 24, crypt method 32, L1 size 36 and
//! offset 40, refcount table offset 48 and clusters 56, snapshots 60/64; version 3 adds the
//! feature words 72/80/88, refcount_order 96, header_length 100 and compression_type 104.

use super::super::Format;

/// The first four bytes of every qcow2 image: "QFI\xfb".
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_NAMES: [&str; 5] = [
    "dirty",
    "corrupt",
    "external data file",
    "compression type",
    "extended L2 entries",
];
/// Compatible feature bit: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Smallest and largest cluster sizes (512 B and 2 MiB), as log2.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need clusters of at least 16 KiB (512-byte subclusters).
pub const MIN_EXTL2_CLUSTER_BITS: u32 = 14;
/// Largest L1 table (32 MiB) and refcount table (8 MiB) accepted, as in QEMU.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name (QEMU's limit).
pub const MAX_BACKING_NAME: u32 = 1023;
/// Largest virtual size accepted (QEMU's limit: 32 MiB of L1 at 2 MiB clusters is more).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 55;
/// Length of a version 3 header as ferrovm writes it (with compression_type and padding).
pub const V3_HEADER_LEN: u32 = 112;

/// Compression algorithms for compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

/// A parsed, checked header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    /// From the backing file name field.
    pub backing_file: Option<String>,
    /// From the backing format extension.
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are extended (128 bits: descriptor and subcluster bitmap).
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Entries in one L2 table (8 bytes each, 16 with extended L2 entries).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2() { 16 } else { 8 }
    }

    /// L1 entries needed to map the virtual size.
    pub fn l1_needed(&self) -> u64 {
        let per_l1 = self.cluster_size() * self.l2_entries();
        self.size.div_ceil(per_l1)
    }

    /// Parses the header from `buf`, the image's first cluster (or its whole file when
    /// shorter), for a file of `file_len` bytes. Every error is a sentence about the field.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, String> {
        if buf.len() < 72 {
            return Err(format!("the header is truncated ({} bytes)", buf.len()));
        }
        if buf[..4] != MAGIC {
            return Err("bad magic (not a qcow2 image)".into());
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(format!("version {version} (only 2 and 3 exist)"));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression: Compression::Zlib,
            backing_file: None,
            backing_format: None,
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(format!("the v3 header is truncated ({} bytes)", buf.len()));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
        }
        h.check_geometry(buf.len(), file_len)?;
        if version == 3 && h.header_length > 104 && h.incompatible & INCOMPAT_COMPRESSION != 0 {
            h.compression = match buf[104] {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                t => return Err(format!("unknown compression type {t}")),
            };
        } else if h.incompatible & INCOMPAT_COMPRESSION != 0 {
            return Err("the compression type bit is set but the header has no type".into());
        }
        h.parse_backing_name(buf)?;
        h.parse_extensions(buf)?;
        Ok(h)
    }

    fn check_geometry(&self, buf_len: usize, file_len: u64) -> Result<(), String> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(format!(
                "cluster_bits {} (the cluster size must be 512 B to 2 MiB)",
                self.cluster_bits
            ));
        }
        if self.extended_l2() && self.cluster_bits < MIN_EXTL2_CLUSTER_BITS {
            return Err(format!(
                "extended L2 entries with cluster_bits {} (at least {MIN_EXTL2_CLUSTER_BITS}: \
                 16 KiB clusters)",
                self.cluster_bits
            ));
        }
        let cs = self.cluster_size();
        if self.version == 3
            && (self.header_length < 104
                || self.header_length % 8 != 0
                || u64::from(self.header_length) > cs
                || self.header_length as usize > buf_len)
        {
            return Err(format!("header_length {}", self.header_length));
        }
        if self.refcount_order > 6 {
            return Err(format!(
                "refcount_order {} (at most 6: 64-bit refcounts)",
                self.refcount_order
            ));
        }
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(format!("virtual size {} is too large", self.size));
        }
        if u64::from(self.l1_size) < self.l1_needed() {
            return Err(format!(
                "L1 table of {} entries cannot map the virtual size {} ({} needed)",
                self.l1_size,
                self.size,
                self.l1_needed()
            ));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(format!("L1 table of {} entries is too large", self.l1_size));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES || self.refcount_table_clusters == 0 {
            return Err(format!(
                "refcount table of {} clusters",
                self.refcount_table_clusters
            ));
        }
        let tables = [
            ("L1 table", self.l1_table_offset, l1_bytes),
            ("refcount table", self.refcount_table_offset, rt_bytes),
        ];
        for (name, off, len) in tables {
            if len == 0 {
                continue;
            }
            if off % cs != 0 || off == 0 {
                return Err(format!("{name} offset {off:#x} is not a cluster boundary"));
            }
            if !super::super::in_range(off, len, file_len) {
                return Err(format!(
                    "{name} at {off:#x} (+{len}) lies beyond the end of the file ({file_len} bytes)"
                ));
            }
        }
        let (l1, rt) = (tables[0], tables[1]);
        if l1.2 > 0 && l1.1 < rt.1 + rt.2 && rt.1 < l1.1 + l1.2 {
            return Err("the L1 table and the refcount table overlap".into());
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, buf: &[u8]) -> Result<(), String> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        if self.backing_file_size > MAX_BACKING_NAME {
            return Err(format!(
                "backing file name of {} bytes (at most {MAX_BACKING_NAME})",
                self.backing_file_size
            ));
        }
        let start = usize::try_from(self.backing_file_offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(self.backing_file_size as usize);
        let name = buf
            .get(start..end)
            .ok_or("the backing file name lies outside the first cluster")?;
        let name = std::str::from_utf8(name).map_err(|_| "the backing file name is not UTF-8")?;
        self.backing_file = Some(name.to_string());
        Ok(())
    }

    /// Walks the header extensions between the header and the end of the first cluster.
    fn parse_extensions(&mut self, buf: &[u8]) -> Result<(), String> {
        let mut off = self.header_length as usize;
        let mut names: Vec<(u8, u8, String)> = Vec::new();
        while off + 8 <= buf.len() {
            let typ = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            let data = buf
                .get(off + 8..off + 8 + len)
                .ok_or_else(|| format!("header extension {typ:#x} of {len} bytes is truncated"))?;
            match typ {
                EXT_END => break,
                EXT_BACKING_FORMAT => {
                    let s = std::str::from_utf8(data).map_err(|_| "backing format is not UTF-8")?;
                    self.backing_format = Some(s.trim_end_matches('\0').to_string());
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name = String::from_utf8_lossy(&e[2..]);
                        names.push((e[0], e[1], name.trim_end_matches('\0').to_string()));
                    }
                }
                EXT_CRYPTO => return Err("an encryption header is present".into()),
                EXT_DATA_FILE => {}
                _ => {}
            }
            off += 8 + len.div_ceil(8) * 8;
        }
        self.check_incompatible(&names)
    }

    fn check_incompatible(&self, names: &[(u8, u8, String)]) -> Result<(), String> {
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        let unknown = self.incompatible & !known;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let name = names
                .iter()
                .find(|(t, b, _)| *t == 0 && u32::from(*b) == bit)
                .map(|(_, _, n)| format!(" ({n})"))
                .unwrap_or_default();
            return Err(format!(
                "unknown incompatible feature bit {bit}{name}: this image needs a newer reader"
            ));
        }
        Ok(())
    }

    /// Why the image cannot be used at all (read-only or not), if it cannot.
    pub fn unsupported(&self) -> Option<String> {
        if self.crypt_method != 0 {
            return Some(format!("encryption (method {})", self.crypt_method));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Some("an external data file".into());
        }
        None
    }

    /// Why the image must not be written, if it must not.
    pub fn refuses_writes(&self) -> Option<String> {
        if self.incompatible & INCOMPAT_DIRTY != 0 {
            return Some(
                "the dirty bit is set (lazy refcounts after an unclean shutdown): repair it with \
                 `qemu-img check -r all` or open it readonly=on"
                    .into(),
            );
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return Some(
                "the corrupt bit is set: repair it with `qemu-img check -r all` or open it \
                 readonly=on"
                    .into(),
            );
        }
        if self.extended_l2() {
            return Some(
                "it has extended L2 entries (subclusters), which ferrovm reads but does not \
                 write: open it readonly=on (or overlay=on), or convert it with `qemu-img \
                 convert -O qcow2 -o extended_l2=off`"
                    .into(),
            );
        }
        if self.nb_snapshots != 0 {
            return Some(format!(
                "it has {} internal snapshot(s), which ferrovm does not write through: open it \
                 readonly=on, or delete them with `qemu-img snapshot -d`",
                self.nb_snapshots
            ));
        }
        None
    }

    /// The names of the set incompatible feature bits, for `img info`.
    pub fn incompatible_names(&self) -> Vec<&'static str> {
        (0..INCOMPAT_NAMES.len())
            .filter(|b| self.incompatible & (1 << b) != 0)
            .map(|b| INCOMPAT_NAMES[b])
            .collect()
    }

    /// Serialises a version 3 header with the backing file extensions, for a new image.
    /// Returns the bytes of the first cluster (header, extensions, backing file name).
    pub fn serialize_v3(&self) -> Result<Vec<u8>, String> {
        let mut b = vec![0u8; V3_HEADER_LEN as usize];
        let put32 =
            |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_be_bytes());
        b[..4].copy_from_slice(&MAGIC);
        put32(&mut b, 4, 3);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put64(&mut b, 72, self.incompatible);
        put64(&mut b, 80, self.compatible);
        put64(&mut b, 88, self.autoclear);
        put32(&mut b, 96, self.refcount_order);
        put32(&mut b, 100, V3_HEADER_LEN);
        if let Some(fmt) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        push_ext(&mut b, EXT_FEATURE_TABLE, &feature_table());
        push_ext(&mut b, EXT_END, &[]);
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(format!("backing file name of {} bytes", name.len()));
            }
            let off = b.len() as u64;
            put64(&mut b, 8, off);
            put32(&mut b, 16, name.len() as u32);
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err("the header does not fit in the first cluster".into());
        }
        Ok(b)
    }
}

fn push_ext(b: &mut Vec<u8>, typ: u32, data: &[u8]) {
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b.resize(b.len().div_ceil(8) * 8, 0);
}

/// The feature name table ferrovm writes (what `qemu-img info` shows for unknown bits).
fn feature_table() -> Vec<u8> {
    let mut t = Vec::new();
    let entries: [(u8, u8, &str); 6] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
    ];
    for (typ, bit, name) in entries {
        let mut e = [0u8; 48];
        e[0] = typ;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        t.extend_from_slice(&e);
    }
    t
}

/// The format tag errors carry.
pub const FORMAT: Format = Format::Qcow2;
