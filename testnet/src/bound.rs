//! The physical lower bound on distributing one file to N receivers (Kumar & Ross, 2006):
//!
//! ```text
//! T_min = max( F / u_seed,  F / d_min,  N * F / (u_seed + sum of the N peers' upload rates) )
//! ```
//!
//! the origin must send every byte at least once, the slowest receiver must download every
//! byte, and all N copies must be uploaded by someone. Every report compares against it.

/// Rates in bytes per second, size in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct FluidBound {
    pub file_bytes: f64,
    pub seed_upload: f64,
    /// Download rate of each receiver.
    pub downloads: Vec<f64>,
    /// Upload rate of each receiver.
    pub uploads: Vec<f64>,
}

impl FluidBound {
    /// T_min in seconds; infinite when nobody can send or someone cannot receive.
    pub fn seconds(&self) -> f64 {
        let f = self.file_bytes;
        let n = self.downloads.len() as f64;
        if n == 0.0 {
            return 0.0;
        }
        let d_min = self.downloads.iter().copied().fold(f64::INFINITY, f64::min);
        let total_up = self.seed_upload + self.uploads.iter().sum::<f64>();
        [f / self.seed_upload, f / d_min, n * f / total_up]
            .into_iter()
            .map(|t| if t.is_nan() { f64::INFINITY } else { t })
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_term_can_dominate() {
        let mb = 1e6;
        // Slow seed: the seed term.
        let b = FluidBound {
            file_bytes: 100.0 * mb,
            seed_upload: 1.0 * mb,
            downloads: vec![100.0 * mb; 4],
            uploads: vec![100.0 * mb; 4],
        };
        assert_eq!(b.seconds(), 100.0);
        // Slow receiver: the download term.
        let b = FluidBound {
            file_bytes: 100.0 * mb,
            seed_upload: 100.0 * mb,
            downloads: vec![100.0 * mb, 10.0 * mb],
            uploads: vec![100.0 * mb; 2],
        };
        assert_eq!(b.seconds(), 10.0);
        // Receivers that cannot upload: N copies through the seed alone.
        let b = FluidBound {
            file_bytes: 100.0 * mb,
            seed_upload: 10.0 * mb,
            downloads: vec![100.0 * mb; 5],
            uploads: vec![0.0; 5],
        };
        assert_eq!(b.seconds(), 50.0);
    }
}
