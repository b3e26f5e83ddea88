//! De-identification of DICOM uploads per DICOM PS3.15 Annex E, the Basic Application Level
//! Confidentiality Profile (Table E.1-1), applied to every nested sequence item as well.
//!
//! The profile's action codes are applied in a simplified, always-safe way, because mica never
//! sends the DICOM object anywhere (only pixels leave this module) and so has no need to keep
//! it conformant:
//! - `X`, `X/Z`, `X/D`, `X/Z/D`, `X/Z/U*`: the attribute is removed (`X`);
//! - `Z`, `Z/D`: its value is emptied (`Z`);
//! - `D`: its value is replaced by a dummy of the same VR (`D`; a sequence with `D` is removed
//!   and reported as `X`, a binary value is emptied and reported as `Z`);
//! - `U`: each UID is replaced by `2.25.<decimal>` derived from SHA-256 of a per-process random
//!   salt and the original UID, so UIDs stay consistent within the process (two images of one
//!   study still share a StudyInstanceUID) but cannot be recovered or recomputed elsewhere.
//!
//! Beyond the table: every private attribute (odd group) is removed, as are curve data
//! (groups 50xx) and overlay data and comments (60xx,3000 / 60xx,4000), which the table lists as
//! repeating groups; any other attribute of the patient group (0010,xxxx) that the table does
//! not name is removed too, since that group exists to describe the person. The file meta's
//! MediaStorageSOPInstanceUID gets the same replacement as SOPInstanceUID.
//!
//! Only attribute names and action codes are reported, never values.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use dicom_core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Tag, VR};
use dicom_object::{DefaultDicomObject, InMemDicomObject};
use sha2::{Digest, Sha256};

#[path = "deid_table.rs"]
mod table;

/// An action code of PS3.15 Table E.1-1 as the table writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::upper_case_acronyms)]
pub(crate) enum ProfileCode {
    X,
    Z,
    D,
    U,
    ZD,
    XZ,
    XD,
    XZD,
    XZU,
}

/// What was done to an attribute (serialised as the profile's letter).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum DeidCode {
    /// Removed.
    #[serde(rename = "X")]
    Removed,
    /// Kept with an empty value.
    #[serde(rename = "Z")]
    Emptied,
    /// Value replaced by a dummy of the same VR.
    #[serde(rename = "D")]
    Dummy,
    /// UID(s) replaced by consistent new UIDs.
    #[serde(rename = "U")]
    UidReplaced,
}

impl DeidCode {
    /// The profile's letter: `X`, `Z`, `D` or `U`.
    pub fn letter(self) -> &'static str {
        match self {
            DeidCode::Removed => "X",
            DeidCode::Emptied => "Z",
            DeidCode::Dummy => "D",
            DeidCode::UidReplaced => "U",
        }
    }
}

/// One attribute de-identification touched, for the case view. Occurrences inside sequence
/// items are counted into the same entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeidAction {
    /// `(gggg,eeee)` in hex, or `private` for all private attributes together.
    pub tag: String,
    /// The DICOM keyword (`PatientName`), or `private attributes`.
    pub keyword: String,
    pub action: DeidCode,
    /// How many elements got this action (top level and nested).
    pub count: u32,
    /// True when at least one occurrence was inside a sequence item.
    pub nested: bool,
}

/// Replaces UIDs consistently: the same input UID always gives the same output UID for one
/// salt. [`UidRemapper::process`] uses one random salt per process.
#[derive(Clone)]
pub struct UidRemapper {
    salt: [u8; 32],
}

impl std::fmt::Debug for UidRemapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UidRemapper(..)")
    }
}

impl UidRemapper {
    /// The process-wide remapper (random salt drawn once).
    pub fn process() -> &'static UidRemapper {
        static R: OnceLock<UidRemapper> = OnceLock::new();
        R.get_or_init(|| {
            use rand::RngCore;
            let mut salt = [0u8; 32];
            rand::rng().fill_bytes(&mut salt);
            UidRemapper { salt }
        })
    }

    /// A remapper with a fixed salt (tests, or a deployment that must map UIDs identically
    /// across restarts; the salt is then a secret).
    pub fn with_salt(salt: [u8; 32]) -> Self {
        UidRemapper { salt }
    }

    /// `2.25.` followed by the decimal of the first 128 bits of SHA-256(salt, uid): a UUID-
    /// derived UID (PS3.5 B.2), at most 44 characters.
    pub fn map(&self, uid: &str) -> String {
        let uid = uid.trim_end_matches(['\0', ' ']).trim();
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(uid.as_bytes());
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        format!("2.25.{}", u128::from_be_bytes(b))
    }
}

/// Key of the private-attributes summary entry.
const PRIVATE_KEY: u32 = u32::MAX;

#[derive(Default)]
struct Log {
    entries: BTreeMap<(u32, DeidCode), (u32, bool)>,
}

impl Log {
    fn note(&mut self, key: u32, code: DeidCode, nested: bool) {
        let e = self.entries.entry((key, code)).or_insert((0, false));
        e.0 += 1;
        e.1 |= nested;
    }

    fn into_actions(self) -> Vec<DeidAction> {
        self.entries
            .into_iter()
            .map(|((key, action), (count, nested))| {
                let (tag, keyword) = if key == PRIVATE_KEY {
                    ("private".to_string(), "private attributes".to_string())
                } else {
                    let t = Tag((key >> 16) as u16, key as u16);
                    (format!("({:04X},{:04X})", t.0, t.1), keyword(t))
                };
                DeidAction {
                    tag,
                    keyword,
                    action,
                    count,
                    nested,
                }
            })
            .collect()
    }
}

/// The DICOM keyword of a tag (`PatientName`), or `(gggg,eeee)` when the dictionary lacks it.
pub fn keyword(tag: Tag) -> String {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    dicom_dictionary_std::StandardDataDictionary
        .by_tag(tag)
        .map(|e| e.alias().to_string())
        .unwrap_or_else(|| format!("({:04X},{:04X})", tag.group(), tag.element()))
}

/// What the Basic Profile (as simplified above) does to `tag`; `None` keeps it.
fn rule(tag: Tag) -> Option<DeidCode> {
    let (g, e) = (tag.group(), tag.element());
    if g % 2 == 1 {
        return Some(DeidCode::Removed);
    }
    if (0x5000..=0x50FF).contains(&g)
        || ((0x6000..=0x60FF).contains(&g) && (e == 0x3000 || e == 0x4000))
    {
        return Some(DeidCode::Removed);
    }
    let key = (u32::from(g) << 16) | u32::from(e);
    if let Ok(i) = table::BASIC_PROFILE.binary_search_by_key(&key, |(k, _)| *k) {
        return Some(match table::BASIC_PROFILE[i].1 {
            ProfileCode::X
            | ProfileCode::XZ
            | ProfileCode::XD
            | ProfileCode::XZD
            | ProfileCode::XZU => DeidCode::Removed,
            ProfileCode::Z | ProfileCode::ZD => DeidCode::Emptied,
            ProfileCode::D => DeidCode::Dummy,
            ProfileCode::U => DeidCode::UidReplaced,
        });
    }
    if g == 0x0010 {
        return Some(DeidCode::Removed);
    }
    None
}

/// A dummy value for a VR, or `None` where only an empty value fits (binary data).
fn dummy(vr: VR) -> Option<PrimitiveValue> {
    let s = match vr {
        VR::PN | VR::LO | VR::SH | VR::LT | VR::ST | VR::UT | VR::UC | VR::CS | VR::AE => {
            "ANONYMOUS"
        }
        VR::DA => "19000101",
        VR::TM => "000000",
        VR::DT => "19000101000000",
        VR::AS => "000Y",
        VR::IS | VR::DS => "0",
        _ => return None,
    };
    Some(PrimitiveValue::from(s))
}

/// Applies the profile to a dataset and, recursively, to every item of every sequence it
/// keeps. Returns what was done, sorted by tag.
pub fn deidentify_dataset(obj: &mut InMemDicomObject, uids: &UidRemapper) -> Vec<DeidAction> {
    let mut log = Log::default();
    apply(obj, uids, &mut log, false);
    log.into_actions()
}

/// [`deidentify_dataset`] on a file object, plus its file meta: the MediaStorageSOPInstanceUID
/// gets the same new UID as the dataset's SOPInstanceUID.
pub fn deidentify_file(obj: &mut DefaultDicomObject, uids: &UidRemapper) -> Vec<DeidAction> {
    let mut log = Log::default();
    apply(obj, uids, &mut log, false);
    let old = obj.meta().media_storage_sop_instance_uid().to_string();
    if !old.is_empty() {
        let new = uids.map(&old);
        obj.update_meta(|m| m.media_storage_sop_instance_uid = new);
        log.note(0x0002_0003, DeidCode::UidReplaced, false);
    }
    log.into_actions()
}

fn apply(obj: &mut InMemDicomObject, uids: &UidRemapper, log: &mut Log, nested: bool) {
    let tags: Vec<Tag> = obj.tags().collect();
    for tag in tags {
        let key = (u32::from(tag.group()) << 16) | u32::from(tag.element());
        match rule(tag) {
            Some(DeidCode::Removed) => {
                obj.remove_element(tag);
                log.note(
                    if tag.group() % 2 == 1 {
                        PRIVATE_KEY
                    } else {
                        key
                    },
                    DeidCode::Removed,
                    nested,
                );
                continue;
            }
            Some(DeidCode::Emptied) => {
                let vr = obj.get(tag).map(|e| e.vr()).unwrap_or(VR::UN);
                let elt = if vr == VR::SQ {
                    DataElement::new(
                        tag,
                        VR::SQ,
                        Value::from(DataSetSequence::<InMemDicomObject>::empty()),
                    )
                } else {
                    DataElement::new(tag, vr, PrimitiveValue::Empty)
                };
                obj.put(elt);
                log.note(key, DeidCode::Emptied, nested);
                continue;
            }
            Some(DeidCode::Dummy) => {
                let vr = obj.get(tag).map(|e| e.vr()).unwrap_or(VR::UN);
                if vr == VR::SQ {
                    obj.remove_element(tag);
                    log.note(key, DeidCode::Removed, nested);
                } else if vr == VR::UI {
                    replace_uids(obj, tag, uids);
                    log.note(key, DeidCode::UidReplaced, nested);
                } else if let Some(v) = dummy(vr) {
                    obj.put(DataElement::new(tag, vr, v));
                    log.note(key, DeidCode::Dummy, nested);
                } else {
                    obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
                    log.note(key, DeidCode::Emptied, nested);
                }
                continue;
            }
            Some(DeidCode::UidReplaced) => {
                replace_uids(obj, tag, uids);
                log.note(key, DeidCode::UidReplaced, nested);
                continue;
            }
            None => {}
        }
        let is_seq = obj
            .get(tag)
            .map(|e| matches!(e.value(), Value::Sequence(_)))
            .unwrap_or(false);
        if is_seq {
            obj.update_value(tag, |v| {
                if let Some(items) = v.items_mut() {
                    for item in items.iter_mut() {
                        apply(item, uids, log, true);
                    }
                }
            });
        }
    }
}

/// Replaces every value of a UI element (or empties a non-UI one given a `U` rule).
fn replace_uids(obj: &mut InMemDicomObject, tag: Tag, uids: &UidRemapper) {
    let Some(e) = obj.get(tag) else { return };
    let vr = e.vr();
    let values: Vec<String> = match e.value() {
        Value::Primitive(p) if vr == VR::UI => {
            p.to_multi_str().iter().map(|s| uids.map(s)).collect()
        }
        _ => Vec::new(),
    };
    let value = if values.is_empty() {
        PrimitiveValue::Empty
    } else {
        PrimitiveValue::Strs(values.into())
    };
    obj.put(DataElement::new(
        tag,
        if vr == VR::UI { VR::UI } else { vr },
        value,
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_dictionary_std::tags;

    #[test]
    fn the_table_is_sorted_and_holds_the_named_attributes() {
        assert!(table::BASIC_PROFILE.windows(2).all(|w| w[0].0 < w[1].0));
        for (t, want) in [
            (tags::PATIENT_NAME, DeidCode::Emptied),
            (tags::PATIENT_ID, DeidCode::Emptied),
            (tags::PATIENT_BIRTH_DATE, DeidCode::Emptied),
            (tags::OTHER_PATIENT_I_DS_SEQUENCE, DeidCode::Removed),
            (tags::ACQUISITION_DATE_TIME, DeidCode::Removed),
            (tags::STUDY_DESCRIPTION, DeidCode::Removed),
            (tags::SERIES_DESCRIPTION, DeidCode::Removed),
            (tags::PROTOCOL_NAME, DeidCode::Removed),
            (tags::REQUEST_ATTRIBUTES_SEQUENCE, DeidCode::Removed),
            (tags::REFERENCED_PATIENT_SEQUENCE, DeidCode::Removed),
            (
                tags::REFERRING_PHYSICIAN_IDENTIFICATION_SEQUENCE,
                DeidCode::Removed,
            ),
            (tags::STUDY_INSTANCE_UID, DeidCode::UidReplaced),
            (tags::REFERENCED_SOP_INSTANCE_UID, DeidCode::UidReplaced),
            (tags::DEVICE_SERIAL_NUMBER, DeidCode::Removed),
            (tags::ACCESSION_NUMBER, DeidCode::Emptied),
            (Tag(0x6000, 0x3000), DeidCode::Removed),
            (Tag(0x0009, 0x1001), DeidCode::Removed),
            (Tag(0x0010, 0x9999), DeidCode::Removed),
        ] {
            assert_eq!(rule(t), Some(want), "{}", keyword(t));
        }
        // Needed for routing and pixels; not identifying.
        for t in [
            tags::MODALITY,
            tags::BODY_PART_EXAMINED,
            tags::ROWS,
            tags::PIXEL_DATA,
            tags::SOP_CLASS_UID,
        ] {
            assert_eq!(rule(t), None, "{}", keyword(t));
        }
    }

    #[test]
    fn nested_items_are_cleaned_and_uids_stay_consistent() {
        let item = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::REFERENCED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3.4"),
            ),
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^Jane")),
        ]);
        let mut obj = InMemDicomObject::from_element_iter([
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^Jane")),
            DataElement::new(
                tags::STUDY_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3.4"),
            ),
            DataElement::new(
                tags::REFERENCED_SERIES_SEQUENCE,
                VR::SQ,
                Value::from(DataSetSequence::from(vec![item])),
            ),
            DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("CR")),
        ]);
        let uids = UidRemapper::with_salt([7; 32]);
        let actions = deidentify_dataset(&mut obj, &uids);
        let name = actions.iter().find(|a| a.keyword == "PatientName").unwrap();
        assert_eq!(
            (name.action, name.count, name.nested),
            (DeidCode::Emptied, 2, true)
        );
        let new = obj
            .get(tags::STUDY_INSTANCE_UID)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(new.starts_with("2.25.") && new.len() <= 64, "{new}");
        let seq = obj.get(tags::REFERENCED_SERIES_SEQUENCE).unwrap();
        let inner = &seq.items().unwrap()[0];
        assert_eq!(
            inner
                .get(tags::REFERENCED_SOP_INSTANCE_UID)
                .unwrap()
                .to_str()
                .unwrap(),
            new
        );
        assert_eq!(inner.get(tags::PATIENT_NAME).unwrap().to_str().unwrap(), "");
        assert_eq!(obj.get(tags::MODALITY).unwrap().to_str().unwrap(), "CR");
        assert_ne!(UidRemapper::with_salt([8; 32]).map("1.2.3.4"), new);
    }
}
