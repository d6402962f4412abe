//! What the engine's one lock guards: the metadata (`Meta`, the engine core, which names no
//! dedup type) and, for an image served with dedup, the dedup state beside it. Code that needs
//! only the metadata reaches it through `Deref`; dedup code takes the whole `State`.

use super::dedup::store::Dedup;
use super::meta::Meta;
use std::ops::{Deref, DerefMut};

pub(crate) struct State {
    pub meta: Meta,
    /// Inline and background dedup, when the image is served with it.
    pub dedup: Option<Dedup>,
}

impl Deref for State {
    type Target = Meta;
    fn deref(&self) -> &Meta {
        &self.meta
    }
}

impl DerefMut for State {
    fn deref_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
}
