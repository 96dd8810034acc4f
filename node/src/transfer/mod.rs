//! Moving piece bytes: downloads driven by the scheduler, uploads from the library, and the
//! rate limits an operator sets.

pub mod download;
pub mod ratelimit;
pub mod upload;
