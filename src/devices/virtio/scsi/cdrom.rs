//! A read-only CD-ROM logical unit: the SCSI (SPC) and MMC commands that firmware and Linux's
//! `sr` driver send, answered from the image's size. This module never touches guest memory
//! or the image: it turns a CDB into a [`Reply`] (bytes to return, a range to read, or a
//! CHECK CONDITION with its sense), and the request path does the transfer.
//!
//! What a guest sees: one data track starting at LBA 0 covering the whole image, 2048-byte
//! blocks, a medium that is always present and never changes, a drive that cannot write.
//! Anything else gets ILLEGAL REQUEST with the sense a real drive gives (invalid operation
//! code, invalid field in CDB, LBA out of range), so a driver's probing falls back cleanly.

/// A CD-ROM block.
pub const BLOCK_SIZE: u64 = 2048;

/// Peripheral device type "CD/DVD device" (SPC-3 table 83).
const TYPE_CDROM: u8 = 0x05;
/// INQUIRY byte 0 for a LUN the target does not have (qualifier 3, type 0x1f).
const NO_LUN: u8 = 0x7f;

/// Sense keys and additional sense codes used here (SPC-3 4.5.6, annex D).
const KEY_NO_SENSE: u8 = 0x00;
const KEY_MEDIUM_ERROR: u8 = 0x03;
const KEY_ILLEGAL_REQUEST: u8 = 0x05;
const ASC_UNRECOVERED_READ: u8 = 0x11;
const ASC_INVALID_OPCODE: u8 = 0x20;
const ASC_LBA_OUT_OF_RANGE: u8 = 0x21;
const ASC_INVALID_FIELD_IN_CDB: u8 = 0x24;
const ASC_LUN_NOT_SUPPORTED: u8 = 0x25;
const ASC_SAVING_NOT_SUPPORTED: u8 = 0x39;

/// The sense data of a CHECK CONDITION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    const fn new(key: u8, asc: u8) -> Sense {
        Sense { key, asc, ascq: 0 }
    }

    pub const INVALID_OPCODE: Sense = Sense::new(KEY_ILLEGAL_REQUEST, ASC_INVALID_OPCODE);
    pub const INVALID_FIELD: Sense = Sense::new(KEY_ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(KEY_ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(KEY_ILLEGAL_REQUEST, ASC_LUN_NOT_SUPPORTED);
    pub const READ_ERROR: Sense = Sense::new(KEY_MEDIUM_ERROR, ASC_UNRECOVERED_READ);
    const SAVING_NOT_SUPPORTED: Sense = Sense::new(KEY_ILLEGAL_REQUEST, ASC_SAVING_NOT_SUPPORTED);
    const NONE: Sense = Sense::new(KEY_NO_SENSE, 0);

    /// Fixed-format sense data (SPC-3 4.5.3), 18 bytes.
    pub fn fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70; // current error, fixed format
        b[2] = self.key;
        b[7] = 10; // additional sense length
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }
}

/// What a command produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// GOOD status with this data-in payload (already cut to the allocation length).
    Data(Vec<u8>),
    /// GOOD status, no data.
    Good,
    /// GOOD status once `len` bytes from image offset `offset` reach the data-in buffer.
    Read { offset: u64, len: u64 },
    /// CHECK CONDITION status with this sense.
    Check(Sense),
}

/// One CD-ROM logical unit (LUN 0 of its target).
#[derive(Debug, Clone)]
pub struct CdRom {
    blocks: u64,
    serial: String,
}

fn be16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn be32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// `data` cut to the allocation length `alloc`.
fn cut(mut data: Vec<u8>, alloc: u64) -> Reply {
    data.truncate(usize::try_from(alloc).unwrap_or(usize::MAX));
    Reply::Data(data)
}

/// Frames from LBA 0 to `lba`, as MSF (minute, second, frame; 75 frames a second, the
/// 2-second pregap included): the 4-byte address field of READ TOC with MSF set.
fn msf(lba: u64) -> [u8; 4] {
    let f = lba.saturating_add(150);
    let m = (f / (75 * 60)).min(255) as u8;
    [0, m, ((f / 75) % 60) as u8, (f % 75) as u8]
}

impl CdRom {
    /// A unit over an image of `size` bytes (whole blocks only); `serial` is the unit serial
    /// number it reports.
    pub fn new(size: u64, serial: &str) -> CdRom {
        CdRom {
            blocks: size / BLOCK_SIZE,
            serial: serial.to_string(),
        }
    }

    /// The number of 2048-byte blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Executes `cdb` (zero-padded to at least 16 bytes) addressed to `lun`.
    pub fn command(&self, lun: u16, cdb: &[u8; 16]) -> Reply {
        let op = cdb[0];
        if lun != 0 {
            // A target answers INQUIRY and REPORT LUNS for any LUN (SPC-3 6.4.2, 6.21).
            return match op {
                0x12 if cdb[1] & 1 == 0 => cut(inquiry_data(NO_LUN), be16(cdb, 3)),
                0xa0 => report_luns(cdb),
                0x03 => cut(Sense::LUN_NOT_SUPPORTED.fixed().to_vec(), u64::from(cdb[4])),
                _ => Reply::Check(Sense::LUN_NOT_SUPPORTED),
            };
        }
        match op {
            // TEST UNIT READY, PREVENT ALLOW MEDIUM REMOVAL, START STOP UNIT (the tray never
            // opens), SYNCHRONIZE CACHE, SET CD SPEED, VERIFY(10): nothing to do.
            0x00 | 0x1e | 0x1b | 0x35 | 0xbb | 0x2f => Reply::Good,
            0x03 => cut(Sense::NONE.fixed().to_vec(), u64::from(cdb[4])),
            0x12 => self.inquiry(cdb),
            0xa0 => report_luns(cdb),
            0x25 => self.read_capacity10(),
            0x9e if cdb[1] & 0x1f == 0x10 => self.read_capacity16(cdb),
            0x28 => self.read(be32(cdb, 2), be16(cdb, 7)),
            0xa8 => self.read(be32(cdb, 2), be32(cdb, 6)),
            0x88 => self.read(be64(cdb, 2), be32(cdb, 10)),
            0x1a => self.mode_sense(cdb[2], u64::from(cdb[4]), false),
            0x5a => self.mode_sense(cdb[2], be16(cdb, 7), true),
            0x43 => self.read_toc(cdb),
            0x46 => get_configuration(cdb),
            0x4a => event_status(cdb),
            _ => Reply::Check(Sense::INVALID_OPCODE),
        }
    }

    fn inquiry(&self, cdb: &[u8; 16]) -> Reply {
        let alloc = be16(cdb, 3);
        if cdb[1] & 1 == 0 {
            if cdb[2] != 0 {
                return Reply::Check(Sense::INVALID_FIELD);
            }
            return cut(inquiry_data(TYPE_CDROM), alloc);
        }
        // Vital product data pages: supported pages, unit serial number, device identification.
        let serial = self.serial.as_bytes();
        let body: Vec<u8> = match cdb[2] {
            0x00 => vec![0x00, 0x80, 0x83],
            0x80 => serial.to_vec(),
            0x83 => {
                // One T10 vendor ID designator (code set ASCII, type 1): vendor + serial.
                let id = [&b"FERROVM "[..], serial].concat();
                let mut d = vec![0x02, 0x01, 0x00, id.len() as u8];
                d.extend_from_slice(&id);
                d
            }
            _ => return Reply::Check(Sense::INVALID_FIELD),
        };
        let mut page = vec![TYPE_CDROM, cdb[2]];
        page.extend_from_slice(&(body.len() as u16).to_be_bytes());
        page.extend_from_slice(&body);
        cut(page, alloc)
    }

    fn read_capacity10(&self) -> Reply {
        let last = self.blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
        let mut d = last.to_be_bytes().to_vec();
        d.extend_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
        Reply::Data(d)
    }

    fn read_capacity16(&self, cdb: &[u8; 16]) -> Reply {
        let mut d = vec![0u8; 32];
        d[..8].copy_from_slice(&self.blocks.saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
        cut(d, be32(cdb, 10))
    }

    fn read(&self, lba: u64, count: u64) -> Reply {
        match lba.checked_add(count) {
            Some(end) if end <= self.blocks => {}
            _ => return Reply::Check(Sense::LBA_OUT_OF_RANGE),
        }
        if count == 0 {
            return Reply::Good;
        }
        Reply::Read {
            offset: lba * BLOCK_SIZE,
            len: count * BLOCK_SIZE,
        }
    }

    /// MODE SENSE(6)/(10) for the one page a CD-ROM driver reads: 0x2a, the MM capabilities
    /// and mechanical status page (MMC-3 6.3.11); 0x3f (all pages) returns it too.
    fn mode_sense(&self, page_byte: u8, alloc: u64, ten: bool) -> Reply {
        let (control, page) = (page_byte >> 6, page_byte & 0x3f);
        if control == 3 {
            return Reply::Check(Sense::SAVING_NOT_SUPPORTED);
        }
        if page != 0x2a && page != 0x3f {
            return Reply::Check(Sense::INVALID_FIELD);
        }
        let mut caps = [0u8; 20];
        caps[0] = 0x2a;
        caps[1] = 18;
        if control != 1 {
            // control 1 asks which fields are changeable: none.
            caps[2] = 0x3b; // reads CD-R, CD-RW, method 2, DVD-ROM, DVD-R, DVD-RAM
            caps[4] = 0x71; // audio play, mode 2 form 1 and 2, multi-session
            caps[5] = 0xff; // CD-DA commands, accurate stream, R-W, C2 pointers, ISRC, UPC, barcode
            caps[6] = 0x29; // lock, eject, tray loading mechanism
            caps[8..10].copy_from_slice(&(176u16 * 8).to_be_bytes()); // 8x, KB/s (obsolete field)
            caps[14..16].copy_from_slice(&(176u16 * 8).to_be_bytes()); // current read speed
        }
        let mut d = if ten { vec![0u8; 8] } else { vec![0u8; 4] };
        d.extend_from_slice(&caps);
        let len = d.len();
        if ten {
            d[..2].copy_from_slice(&((len - 2) as u16).to_be_bytes());
        } else {
            d[0] = (len - 1) as u8;
        }
        cut(d, alloc)
    }

    /// READ TOC/PMA/ATIP formats 0 (the TOC: track 1 and the lead-out) and 1 (session info),
    /// the format in byte 2, or in byte 9's top bits as older drivers send it (SFF-8020).
    fn read_toc(&self, cdb: &[u8; 16]) -> Reply {
        let use_msf = cdb[1] & 0x02 != 0;
        let format = match cdb[2] & 0x0f {
            0 => cdb[9] >> 6,
            f => f,
        };
        let addr = |lba: u64| {
            if use_msf {
                msf(lba)
            } else {
                (lba.min(u64::from(u32::MAX)) as u32).to_be_bytes()
            }
        };
        let track = cdb[6];
        let mut d = vec![0, 0, 1, 1];
        match format {
            0 => {
                if track > 1 && track != 0xaa {
                    return Reply::Check(Sense::INVALID_FIELD);
                }
                if track <= 1 {
                    d.extend_from_slice(&[0, 0x14, 1, 0]); // ADR 1, data track
                    d.extend_from_slice(&addr(0));
                }
                d.extend_from_slice(&[0, 0x14, 0xaa, 0]); // the lead-out
                d.extend_from_slice(&addr(self.blocks));
            }
            1 => {
                d.extend_from_slice(&[0, 0x14, 1, 0]);
                d.extend_from_slice(&addr(0));
            }
            _ => return Reply::Check(Sense::INVALID_FIELD),
        }
        let len = (d.len() - 2) as u16;
        d[..2].copy_from_slice(&len.to_be_bytes());
        cut(d, be16(cdb, 7))
    }
}

/// Standard INQUIRY data (SPC-3 6.4.2), 36 bytes, with peripheral byte `pdt`.
fn inquiry_data(pdt: u8) -> Vec<u8> {
    let mut d = vec![0u8; 36];
    d[0] = pdt;
    d[1] = 0x80; // removable medium
    d[2] = 0x05; // SPC-3
    d[3] = 0x02; // response data format 2
    d[4] = 31; // additional length
    d[8..16].copy_from_slice(b"FERROVM ");
    d[16..32].copy_from_slice(b"VIRTUAL CD-ROM  ");
    d[32..36].copy_from_slice(b"1.0 ");
    d
}

/// REPORT LUNS (SPC-3 6.21): LUN 0 only.
fn report_luns(cdb: &[u8; 16]) -> Reply {
    let mut d = vec![0u8; 16];
    d[3] = 8; // list length: one 8-byte LUN
    cut(d, be32(cdb, 6))
}

/// GET CONFIGURATION (MMC-3 5.3.6): the CD-ROM profile (0x0008) current, with the profile
/// list (feature 0) and the core feature (1).
fn get_configuration(cdb: &[u8; 16]) -> Reply {
    let rt = cdb[1] & 0x03;
    if rt == 3 {
        return Reply::Check(Sense::INVALID_FIELD);
    }
    let start = be16(cdb, 2);
    let features: [(u64, Vec<u8>); 2] = [
        (0x0000, vec![0x00, 0x00, 0x03, 0x04, 0x00, 0x08, 0x01, 0x00]),
        (
            0x0001,
            vec![0x00, 0x01, 0x0b, 0x08, 0, 0, 0, 1, 0, 0, 0, 0], // SCSI physical interface
        ),
    ];
    let mut d = vec![0u8; 8];
    d[6..8].copy_from_slice(&0x0008u16.to_be_bytes());
    for (code, f) in &features {
        let wanted = match rt {
            2 => *code == start,
            _ => *code >= start,
        };
        if wanted {
            d.extend_from_slice(f);
        }
    }
    let len = (d.len() - 4) as u32;
    d[..4].copy_from_slice(&len.to_be_bytes());
    cut(d, be16(cdb, 7))
}

/// GET EVENT STATUS NOTIFICATION (MMC-3 5.3.8), polled only: the media class says "no
/// change, medium present"; any other class has no event.
fn event_status(cdb: &[u8; 16]) -> Reply {
    if cdb[1] & 1 == 0 {
        return Reply::Check(Sense::INVALID_FIELD); // asynchronous operation
    }
    const MEDIA: u8 = 1 << 4;
    let d = if cdb[4] & MEDIA != 0 {
        vec![0, 4, 0x04, MEDIA, 0x00, 0x02, 0, 0]
    } else {
        vec![0, 2, 0x80, MEDIA] // no event available
    };
    cut(d, be16(cdb, 7))
}
