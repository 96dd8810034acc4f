//! Moving piece bytes: downloads driven by the scheduler, uploads from the library, the haves
//! that tell peers what arrived, and the rate limits an operator sets.

pub mod download;
pub mod haves;
pub mod ratelimit;
pub mod stream_pool;
pub mod upload;
