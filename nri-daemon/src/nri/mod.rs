//! NRI: the ttrpc plugin transport towards containerd / CRI-O.
pub mod handler;
