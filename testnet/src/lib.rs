//! # imiswarm-testnet
//!
//! Runs whole swarms on one machine and measures them against the fluid bound. Owns scenarios,
//! backends and reports; it must not contain swarm logic of its own (that is the node's and the
//! protocol's), so what it measures is what operators run.
//!
//! | module | owns |
//! |---|---|
//! | [`bound`] | the fluid lower bound T_min |
//! | [`sim`] | a swarm in virtual time around the real scheduler |
//! | [`local`] | a real swarm of imiswarm members inside this process, on loopback |
//! | [`demo`] | the README's demo and the `simulate` command |
//! | [`netns`] | test hosts in network namespaces with kernel-shaped links |

pub mod bound;
pub mod demo;
pub mod local;
pub mod netns;
pub mod sim;
