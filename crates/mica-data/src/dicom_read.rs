//! Reading an untrusted DICOM Part 10 file from memory without letting it decide how much memory
//! is used.
//!
//! The DICOM parser allocates each element's declared length before reading it, and inflates a
//! Deflated transfer syntax without bound, so a few hundred bytes could make it allocate
//! gigabytes. Here, before the parser sees anything:
//! 1. the file meta group (0002) is read by hand, bounds-checked, for the Transfer Syntax UID;
//! 2. an unknown transfer syntax, or one whose pixel data cannot be decoded, is refused;
//! 3. a Deflated Explicit VR Little Endian dataset is inflated into a buffer that may not grow
//!    past [`UploadLimits::max_inflated_bytes`];
//! 4. the dataset's element structure is walked: every declared length must fit in the bytes
//!    that remain, sequences may nest at most `max_depth` deep, and elements plus values of
//!    multi-valued text may number at most `max_values` (the parser keeps one `String` per
//!    backslash-separated value, so a megabyte of backslashes would be a million strings).
//!
//! Only then is the dataset parsed, so what the parser allocates is bounded by the input size
//! plus a bounded per-element overhead.

use std::io::{Cursor, Read};

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::uids;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{DefaultDicomObject, InMemDicomObject};
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

use crate::upload::{LimitKind, UploadError, UploadLimits};

/// What the file meta group says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileMeta {
    pub transfer_syntax: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// Offset of the dataset (just after the meta group) in the file.
    pub dataset_start: usize,
}

fn undecodable(message: impl Into<String>) -> UploadError {
    UploadError::Undecodable {
        kind: "DICOM file",
        message: message.into(),
    }
}

fn u16le(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32le(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// VRs with a 4-byte length (after 2 reserved bytes) in explicit VR encodings.
fn long_header(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"UC"
            | b"UR"
            | b"UT"
            | b"UN"
            | b"SV"
            | b"UV"
    )
}

fn uid_text(v: &[u8]) -> String {
    String::from_utf8_lossy(v)
        .trim_end_matches(['\0', ' '])
        .trim()
        .to_string()
}

/// Reads the file meta group of a Part 10 file (128-byte preamble, `DICM`, then group 0002 in
/// explicit VR little endian). Every length is checked against the bytes present.
pub(crate) fn read_meta(bytes: &[u8]) -> Result<FileMeta, UploadError> {
    if bytes.len() < 132 || &bytes[128..132] != b"DICM" {
        return Err(undecodable("no DICM code after the 128-byte preamble"));
    }
    let mut pos = 132;
    let mut meta = FileMeta {
        transfer_syntax: String::new(),
        sop_class_uid: String::new(),
        sop_instance_uid: String::new(),
        dataset_start: 0,
    };
    let truncated = || undecodable("the file meta group is truncated");
    loop {
        let Some(group) = u16le(bytes, pos) else {
            break;
        };
        if group != 0x0002 {
            break;
        }
        let element = u16le(bytes, pos + 2).ok_or_else(truncated)?;
        let vr = bytes.get(pos + 4..pos + 6).ok_or_else(truncated)?;
        let vr = [vr[0], vr[1]];
        let (len, header) = if long_header(vr) {
            (u32le(bytes, pos + 8).ok_or_else(truncated)? as usize, 12)
        } else {
            (u16le(bytes, pos + 6).ok_or_else(truncated)? as usize, 8)
        };
        let start = pos + header;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| {
                undecodable(format!(
                "file meta element (0002,{element:04X}) declares {len} bytes but only {} remain",
                bytes.len().saturating_sub(start)
            ))
            })?;
        let value = &bytes[start..end];
        match element {
            0x0002 => meta.sop_class_uid = uid_text(value),
            0x0003 => meta.sop_instance_uid = uid_text(value),
            0x0010 => meta.transfer_syntax = uid_text(value),
            _ => {}
        }
        pos = end;
    }
    if meta.transfer_syntax.is_empty() {
        return Err(undecodable(
            "the file meta group has no Transfer Syntax UID (0002,0010)",
        ));
    }
    meta.dataset_start = pos;
    Ok(meta)
}

/// Parses a Part 10 file from memory within `limits`. Returns the object (for a deflated file,
/// re-labelled Explicit VR Little Endian, which its inflated dataset is) and the original
/// transfer syntax UID.
pub(crate) fn parse_bounded(
    bytes: &[u8],
    limits: &UploadLimits,
) -> Result<(DefaultDicomObject, String), UploadError> {
    let meta = read_meta(bytes)?;
    let uid = meta.transfer_syntax.clone();
    let deflated = uid == uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN;
    let ts =
        TransferSyntaxRegistry
            .get(&uid)
            .ok_or_else(|| UploadError::UnsupportedTransferSyntax {
                uid: uid.clone(),
                name: None,
            })?;
    if !deflated && (!ts.can_decode_all() || ts.is_unsupported_pixel_encapsulation()) {
        return Err(UploadError::UnsupportedTransferSyntax {
            uid: uid.clone(),
            name: Some(ts.name().to_string()),
        });
    }
    let inflated;
    let (dataset, parse_uid): (&[u8], &str) = if deflated {
        inflated = inflate_capped(&bytes[meta.dataset_start..], limits.max_inflated_bytes)?;
        (&inflated, uids::EXPLICIT_VR_LITTLE_ENDIAN)
    } else {
        (&bytes[meta.dataset_start..], uid.as_str())
    };
    let parse_ts = TransferSyntaxRegistry
        .get(parse_uid)
        .expect("explicit VR little endian is always registered");
    let explicit = parse_uid != uids::IMPLICIT_VR_LITTLE_ENDIAN;
    // Explicit VR Big Endian (retired, but still read).
    let big_endian = parse_uid == "1.2.840.10008.1.2.2";
    Walker {
        buf: dataset,
        big_endian,
        limits,
        values: 0,
    }
    .dataset(0, dataset.len(), 0, explicit, false)?;
    let obj = InMemDicomObject::read_dataset_with_ts(Cursor::new(dataset), parse_ts)
        .map_err(|e| undecodable(format!("cannot parse the dataset: {e}")))?;
    let class = if meta.sop_class_uid.is_empty() {
        obj.get(dicom_dictionary_std::tags::SOP_CLASS_UID)
            .and_then(|e| e.to_str().ok())
            .map(|s| uid_text(s.as_bytes()))
            .unwrap_or_else(|| "1.2.840.10008.5.1.4.1.1.7".to_string())
    } else {
        meta.sop_class_uid.clone()
    };
    let file_meta = FileMetaTableBuilder::new()
        .transfer_syntax(parse_uid)
        .media_storage_sop_class_uid(class)
        .media_storage_sop_instance_uid(meta.sop_instance_uid.clone())
        .build()
        .map_err(|e| undecodable(format!("bad file meta group: {e}")))?;
    Ok((obj.with_exact_meta(file_meta), uid))
}

/// Inflates a raw-deflate stream (PS3.5 A.5: no zlib header) into a buffer that never holds
/// more than `cap` bytes (plus one read chunk); one byte more is an error, not a truncation.
pub(crate) fn inflate_capped(deflated: &[u8], cap: u64) -> Result<Vec<u8>, UploadError> {
    const CHUNK: usize = 64 * 1024;
    let mut dec = flate2::read::DeflateDecoder::new(deflated);
    let mut out: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = dec
            .read(&mut chunk)
            .map_err(|e| undecodable(format!("the deflated dataset cannot be inflated: {e}")))?;
        if n == 0 {
            return Ok(out);
        }
        if out.len() as u64 + n as u64 > cap {
            return Err(UploadError::LimitExceeded {
                limit: LimitKind::InflatedBytes,
                message: format!(
                    "the deflated dataset ({} bytes) inflates to more than {cap} bytes",
                    deflated.len()
                ),
            });
        }
        // Grow exactly, so the buffer's capacity stays at what was inflated.
        out.try_reserve_exact(n)
            .map_err(|_| undecodable("out of memory while inflating"))?;
        out.extend_from_slice(&chunk[..n]);
    }
}

/// Checks the element structure of a dataset before the parser trusts its lengths.
struct Walker<'a> {
    buf: &'a [u8],
    big_endian: bool,
    limits: &'a UploadLimits,
    values: u64,
}

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQ_END: (u16, u16) = (0xFFFE, 0xE0DD);

impl Walker<'_> {
    fn u16(&self, at: usize) -> Result<u16, UploadError> {
        let s = self
            .buf
            .get(at..at + 2)
            .ok_or_else(|| undecodable("the dataset is truncated"))?;
        Ok(if self.big_endian {
            u16::from_be_bytes([s[0], s[1]])
        } else {
            u16::from_le_bytes([s[0], s[1]])
        })
    }

    fn u32(&self, at: usize) -> Result<u32, UploadError> {
        let s = self
            .buf
            .get(at..at + 4)
            .ok_or_else(|| undecodable("the dataset is truncated"))?;
        let a = [s[0], s[1], s[2], s[3]];
        Ok(if self.big_endian {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        })
    }

    fn count(&mut self, n: u64) -> Result<(), UploadError> {
        self.values += n;
        if self.values > self.limits.max_values {
            return Err(UploadError::LimitExceeded {
                limit: LimitKind::Values,
                message: format!(
                    "the dataset has more than {} elements and text values",
                    self.limits.max_values
                ),
            });
        }
        Ok(())
    }

    fn depth(&self, depth: usize) -> Result<(), UploadError> {
        if depth > self.limits.max_depth {
            return Err(UploadError::LimitExceeded {
                limit: LimitKind::Depth,
                message: format!(
                    "sequences are nested more than {} deep",
                    self.limits.max_depth
                ),
            });
        }
        Ok(())
    }

    fn length_error(&self, tag: Tag, len: u32, pos: usize, end: usize) -> UploadError {
        UploadError::LimitExceeded {
            limit: LimitKind::ElementLength,
            message: format!(
                "element ({:04X},{:04X}) at byte {pos} declares {len} bytes but only {} remain",
                tag.0,
                tag.1,
                end.saturating_sub(pos)
            ),
        }
    }

    /// Walks the elements of a dataset in `pos..end`; with `until_item_end`, stops after an
    /// item delimiter (an undefined-length item). Returns the position after the dataset.
    fn dataset(
        &mut self,
        mut pos: usize,
        end: usize,
        depth: usize,
        explicit: bool,
        until_item_end: bool,
    ) -> Result<usize, UploadError> {
        self.depth(depth)?;
        while pos < end {
            let tag = Tag(self.u16(pos)?, self.u16(pos + 2)?);
            if (tag.0, tag.1) == ITEM_END {
                if until_item_end {
                    return Ok(pos + 8);
                }
                return Err(undecodable(format!(
                    "unexpected item delimiter at byte {pos}"
                )));
            }
            if tag.0 == 0xFFFE {
                return Err(undecodable(format!(
                    "unexpected item tag outside a sequence at byte {pos}"
                )));
            }
            let (vr, len, header) = if explicit {
                let raw = self
                    .buf
                    .get(pos + 4..pos + 6)
                    .ok_or_else(|| undecodable("the dataset is truncated"))?;
                let raw = [raw[0], raw[1]];
                let vr = VR::from_binary(raw);
                if long_header(raw) {
                    (vr, self.u32(pos + 8)?, 12)
                } else {
                    (vr, u32::from(self.u16(pos + 6)?), 8)
                }
            } else {
                (implicit_vr(tag), self.u32(pos + 4)?, 8)
            };
            pos += header;
            if pos > end {
                return Err(undecodable("the dataset is truncated"));
            }
            self.count(1)?;
            let is_seq = vr == Some(VR::SQ);
            if len == UNDEFINED {
                if is_seq || vr == Some(VR::UN) || (!explicit && vr.is_none()) {
                    // An undefined-length UN is an implicit VR sequence (PS3.5 6.2.2).
                    let inner_explicit = explicit && is_seq;
                    pos = self.items(pos, end, depth + 1, inner_explicit, true, false)?;
                } else if matches!(vr, Some(VR::OB) | Some(VR::OW))
                    || tag == dicom_dictionary_std::tags::PIXEL_DATA
                {
                    pos = self.items(pos, end, depth + 1, explicit, true, true)?;
                } else {
                    return Err(undecodable(format!(
                        "element ({:04X},{:04X}) has an undefined length but is no sequence",
                        tag.0, tag.1
                    )));
                }
                continue;
            }
            let len_us = len as usize;
            if len_us > end - pos {
                return Err(self.length_error(tag, len, pos, end));
            }
            if is_seq {
                self.items(pos, pos + len_us, depth + 1, explicit, false, false)?;
            } else if vr.map(multi_valued_text).unwrap_or(true) {
                let extra = self.buf[pos..pos + len_us]
                    .iter()
                    .filter(|&&b| b == b'\\')
                    .count();
                self.count(extra as u64)?;
            }
            pos += len_us;
        }
        if until_item_end {
            return Err(undecodable("an item has no item delimiter"));
        }
        Ok(pos)
    }

    /// Walks the items of a sequence (or the fragments of encapsulated pixel data).
    fn items(
        &mut self,
        mut pos: usize,
        end: usize,
        depth: usize,
        explicit: bool,
        undefined: bool,
        fragments: bool,
    ) -> Result<usize, UploadError> {
        self.depth(depth)?;
        while pos < end {
            let tag = Tag(self.u16(pos)?, self.u16(pos + 2)?);
            let len = self.u32(pos + 4)?;
            pos += 8;
            if (tag.0, tag.1) == SEQ_END {
                return Ok(pos);
            }
            if (tag.0, tag.1) != ITEM {
                return Err(undecodable(format!(
                    "expected a sequence item at byte {}, found ({:04X},{:04X})",
                    pos - 8,
                    tag.0,
                    tag.1
                )));
            }
            self.count(1)?;
            if len == UNDEFINED {
                if fragments {
                    return Err(undecodable("a pixel data fragment has an undefined length"));
                }
                pos = self.dataset(pos, end, depth + 1, explicit, true)?;
                continue;
            }
            let len_us = len as usize;
            if pos > end || len_us > end - pos {
                return Err(self.length_error(tag, len, pos, end));
            }
            if !fragments {
                self.dataset(pos, pos + len_us, depth + 1, explicit, false)?;
            }
            pos += len_us;
        }
        if undefined {
            return Err(undecodable("a sequence has no sequence delimiter"));
        }
        Ok(pos)
    }
}

/// The VR an implicit VR parser gives a tag: the dictionary's, `None` when it has none or it
/// depends on context (such elements are treated as text, the stricter case).
fn implicit_vr(tag: Tag) -> Option<VR> {
    if tag.1 == 0x0000 {
        return Some(VR::UL);
    }
    if tag.0 % 2 == 1 && (0x0010..=0x00FF).contains(&tag.1) {
        return Some(VR::LO);
    }
    match dicom_dictionary_std::StandardDataDictionary
        .by_tag(tag)
        .map(|e| e.vr())
    {
        Some(VirtualVr::Exact(vr)) => Some(vr),
        Some(VirtualVr::Xs) => Some(VR::US),
        Some(VirtualVr::Ox) | Some(VirtualVr::Px) => Some(VR::OW),
        Some(VirtualVr::Lt) => Some(VR::US),
        _ => None,
    }
}

/// Text VRs the parser splits at backslashes into one string per value.
fn multi_valued_text(vr: VR) -> bool {
    matches!(
        vr,
        VR::AE
            | VR::AS
            | VR::CS
            | VR::DA
            | VR::DS
            | VR::DT
            | VR::IS
            | VR::LO
            | VR::PN
            | VR::SH
            | VR::TM
            | VR::UC
            | VR::UI
            | VR::UN
    )
}
