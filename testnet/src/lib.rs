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
//! | [`scenario`] | scenario files: nodes, links, image, timed events |
//! | [`image`] | deterministic sample images and their versions |
//! | [`backend`] | where nodes run: processes, namespaces, containers |
//! | [`runner`] | running a scenario on a backend and measuring it |
//! | [`report`] | the report: table, JSON, SVG |
//! | [`http`] | the central HTTP server baseline |
//! | [`hostcpu`] | how busy the host's processors were during a measurement |

pub mod backend;
pub mod bound;
pub mod cli;
pub mod demo;
pub mod hostcpu;
pub mod http;
pub mod image;
pub mod local;
pub mod netns;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod sim;
