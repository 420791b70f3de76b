//! A small FAT16 filesystem image built in memory: a volume label and a few files in the root
//! folder, with long (VFAT) names. What the cloud-init NoCloud seed is made of.
//!
//! Layout: one boot sector (BPB), two FATs, a 512-entry root folder, then the data clusters
//! (one sector each, so any image from 4 MiB to 32 MiB has 4,085 to 65,524 clusters and is
//! FAT16 by the cluster count, as the FAT specification decides the type).

const SECTOR: usize = 512;
const ROOT_ENTRIES: usize = 512;
const MIN_SECTORS: usize = 8192;
const MAX_CLUSTERS: usize = 65_524;

/// Why an image cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VfatError {
    #[error("{0} bytes of files do not fit in a 32 MiB FAT16 seed")]
    TooLarge(usize),
    #[error("file name `{0}` is empty, longer than 255 characters or has a `/`")]
    BadName(String),
    #[error("more files than the root folder holds")]
    TooManyFiles,
}

/// Builds the image: `label` (at most 11 characters, stored upper-case) and `files`.
pub fn build(label: &str, files: &[(&str, &[u8])]) -> Result<Vec<u8>, VfatError> {
    let data_clusters: usize = files.iter().map(|(_, d)| d.len().div_ceil(SECTOR)).sum();
    let root_sectors = ROOT_ENTRIES * 32 / SECTOR;
    // Sectors per FAT for up to MAX_CLUSTERS + 2 entries of 2 bytes.
    let fat_sectors = (MAX_CLUSTERS + 2) * 2 / SECTOR + 1;
    let overhead = 1 + 2 * fat_sectors + root_sectors;
    let total = (overhead + data_clusters).max(MIN_SECTORS);
    let clusters = total - overhead;
    if clusters > MAX_CLUSTERS {
        return Err(VfatError::TooLarge(
            files.iter().map(|(_, d)| d.len()).sum(),
        ));
    }
    let mut img = vec![0u8; total * SECTOR];
    boot_sector(&mut img[..SECTOR], label, total, fat_sectors);
    let mut fat = vec![0u16; clusters + 2];
    fat[0] = 0xfff8;
    fat[1] = 0xffff;
    let root_at = (1 + 2 * fat_sectors) * SECTOR;
    let data_at = root_at + root_sectors * SECTOR;
    let mut root: Vec<[u8; 32]> = vec![label_entry(label)];
    let mut next = 2usize;
    for (i, (name, data)) in files.iter().enumerate() {
        if name.is_empty() || name.len() > 255 || name.contains('/') {
            return Err(VfatError::BadName(name.to_string()));
        }
        let n = data.len().div_ceil(SECTOR);
        let first = if n == 0 { 0 } else { next };
        for k in 0..n {
            fat[next + k] = if k + 1 == n {
                0xffff
            } else {
                (next + k + 1) as u16
            };
        }
        let at = data_at + (next - 2) * SECTOR;
        img[at..at + data.len()].copy_from_slice(data);
        next += n;
        let short = short_name(i);
        root.extend(long_name_entries(name, &short));
        root.push(file_entry(&short, first as u16, data.len() as u32));
    }
    if root.len() > ROOT_ENTRIES {
        return Err(VfatError::TooManyFiles);
    }
    for (k, e) in root.iter().enumerate() {
        img[root_at + k * 32..root_at + (k + 1) * 32].copy_from_slice(e);
    }
    let fat_bytes: Vec<u8> = fat.iter().flat_map(|e| e.to_le_bytes()).collect();
    for copy in 0..2 {
        let at = (1 + copy * fat_sectors) * SECTOR;
        img[at..at + fat_bytes.len()].copy_from_slice(&fat_bytes);
    }
    Ok(img)
}

fn padded_label(label: &str) -> [u8; 11] {
    let mut l = [b' '; 11];
    for (d, c) in l.iter_mut().zip(label.bytes()) {
        *d = c.to_ascii_uppercase();
    }
    l
}

fn boot_sector(b: &mut [u8], label: &str, total: usize, fat_sectors: usize) {
    b[..3].copy_from_slice(&[0xeb, 0x3c, 0x90]);
    b[3..11].copy_from_slice(b"FERROVM ");
    b[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
    b[13] = 1; // sectors per cluster
    b[14..16].copy_from_slice(&1u16.to_le_bytes()); // reserved sectors
    b[16] = 2; // FATs
    b[17..19].copy_from_slice(&(ROOT_ENTRIES as u16).to_le_bytes());
    match u16::try_from(total) {
        Ok(t) => b[19..21].copy_from_slice(&t.to_le_bytes()),
        Err(_) => b[32..36].copy_from_slice(&(total as u32).to_le_bytes()),
    }
    b[21] = 0xf8; // media: fixed disk
    b[22..24].copy_from_slice(&(fat_sectors as u16).to_le_bytes());
    b[24..26].copy_from_slice(&32u16.to_le_bytes()); // sectors per track
    b[26..28].copy_from_slice(&64u16.to_le_bytes()); // heads
    b[36] = 0x80; // drive number
    b[38] = 0x29; // extended boot signature
    b[39..43].copy_from_slice(&0x4645_5252u32.to_le_bytes()); // volume id
    b[43..54].copy_from_slice(&padded_label(label));
    b[54..62].copy_from_slice(b"FAT16   ");
    b[510] = 0x55;
    b[511] = 0xaa;
}

fn label_entry(label: &str) -> [u8; 32] {
    let mut e = [0u8; 32];
    e[..11].copy_from_slice(&padded_label(label));
    e[11] = 0x08; // volume label
    e
}

/// `FILE~N` 8.3 names, unique per file; the long names are what readers show.
fn short_name(i: usize) -> [u8; 11] {
    let mut s = [b' '; 11];
    let base = format!("FILE~{}", i + 1);
    s[..base.len()].copy_from_slice(base.as_bytes());
    s
}

fn file_entry(short: &[u8; 11], cluster: u16, size: u32) -> [u8; 32] {
    let mut e = [0u8; 32];
    e[..11].copy_from_slice(short);
    e[11] = 0x01; // read-only
                  // 2026-01-01 00:00: date = (year - 1980) << 9 | month << 5 | day.
    let date: u16 = ((2026 - 1980) << 9) | (1 << 5) | 1;
    for at in [16, 18, 24] {
        e[at..at + 2].copy_from_slice(&date.to_le_bytes());
    }
    e[26..28].copy_from_slice(&cluster.to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// The VFAT long-name entries for `name`, last part first, as they precede the 8.3 entry.
fn long_name_entries(name: &str, short: &[u8; 11]) -> Vec<[u8; 32]> {
    let sum = short
        .iter()
        .fold(0u8, |s, c| s.rotate_right(1).wrapping_add(*c));
    let mut units: Vec<u16> = name.encode_utf16().collect();
    if units.len() % 13 != 0 {
        units.push(0);
        while units.len() % 13 != 0 {
            units.push(0xffff);
        }
    }
    let parts = units.len() / 13;
    let mut out = Vec::with_capacity(parts);
    for p in (0..parts).rev() {
        let mut e = [0u8; 32];
        e[0] = (p + 1) as u8 | if p + 1 == parts { 0x40 } else { 0 };
        e[11] = 0x0f;
        e[13] = sum;
        let chunk = &units[p * 13..p * 13 + 13];
        let slots = (1..11)
            .step_by(2)
            .chain((14..26).step_by(2))
            .chain((28..32).step_by(2));
        for (slot, u) in slots.zip(chunk) {
            e[slot..slot + 2].copy_from_slice(&u.to_le_bytes());
        }
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn tool(cmd: &mut Command) -> Option<std::process::Output> {
        match cmd.output() {
            Ok(o) => Some(o),
            Err(_) => {
                let test = std::thread::current().name().unwrap_or("?").to_string();
                crate::test_support::skipped(&test, "dosfstools/mtools not installed");
                None
            }
        }
    }

    #[test]
    fn fsck_blkid_and_mtools_agree_with_what_was_written() {
        let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let files: [(&str, &[u8]); 4] = [
            ("user-data", b"#cloud-config\npassword: x\n"),
            ("meta-data", b"instance-id: ferrovm-test\n"),
            ("a-rather-long-file-name-over-26-chars.txt", &big),
            ("empty", b""),
        ];
        let img = build("cidata", &files).unwrap();
        let d = vmm_sys_util::tempdir::TempDir::new_with_prefix("/var/tmp/ferrovm-vfat").unwrap();
        let path = d.as_path().join("seed.img");
        std::fs::write(&path, &img).unwrap();
        let Some(o) = tool(Command::new("fsck.fat").arg("-n").arg(&path)) else {
            return;
        };
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "fsck.fat: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let o = Command::new("blkid").arg(&path).output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("LABEL=\"CIDATA\"") && out.contains("TYPE=\"vfat\""),
            "{out}"
        );
        for (name, data) in files {
            let Some(o) = tool(
                Command::new("mtype")
                    .env("MTOOLS_SKIP_CHECK", "1")
                    .arg("-i")
                    .arg(&path)
                    .arg(format!("::{name}")),
            ) else {
                return;
            };
            assert!(
                o.status.success(),
                "mtype {name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(o.stdout == data, "{name} read back differently");
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(
            build("x", &[("", b"")]),
            Err(VfatError::BadName(_))
        ));
        assert!(matches!(
            build("x", &[("a/b", b"")]),
            Err(VfatError::BadName(_))
        ));
        let huge = vec![0u8; 40 << 20];
        assert!(matches!(
            build("x", &[("f", &huge)]),
            Err(VfatError::TooLarge(_))
        ));
    }
}
