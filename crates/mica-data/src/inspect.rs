//! Dataset inspection (in progress).
pub struct InspectOptions;
pub struct Inspection;
pub fn inspect() {}
