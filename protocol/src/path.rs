//! Path safety: names that come from a manifest must never point outside
//! `<repo>/<image>/<version>/`.
//!
//! Owns the rules for image names and for the relative paths of files inside a version. It checks
//! strings only; it never touches the file system (the store joins a checked path to its own
//! directory and must still refuse to follow symlinks it did not create).

use std::collections::HashSet;

use crate::limits::{MAX_COMPONENT_LEN, MAX_IMAGE_NAME_LEN, MAX_PATH_LEN};

/// Why a name or path from a manifest is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path {0:?} is absolute")]
    Absolute(String),
    #[error("path {0:?} has an empty component")]
    EmptyComponent(String),
    #[error("path {0:?} has a `.` or `..` component")]
    DotComponent(String),
    #[error("path {0:?} contains a forbidden character")]
    ForbiddenChar(String),
    #[error("path of {0} bytes exceeds {MAX_PATH_LEN}")]
    TooLong(usize),
    #[error("path {0:?} has a component longer than {MAX_COMPONENT_LEN} bytes")]
    ComponentTooLong(String),
    #[error("path {0:?} appears twice")]
    Duplicate(String),
    #[error("path {0:?} is both a file and a directory")]
    FileIsDirectory(String),
    #[error(
        "image name {0:?} is not 1-{MAX_IMAGE_NAME_LEN} of [A-Za-z0-9._-] starting with a letter or digit"
    )]
    BadImageName(String),
}

/// Checks an image name: one safe directory component, `[A-Za-z0-9._-]`, starting with a letter
/// or digit (so never `.`, `..` or a hidden directory such as the store's `.partial`).
pub fn check_image_name(name: &str) -> Result<(), PathError> {
    let bad = || PathError::BadImageName(name.to_owned());
    if name.is_empty() || name.len() > MAX_IMAGE_NAME_LEN {
        return Err(bad());
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad());
    }
    Ok(())
}

/// Checks one relative file path of a version: `/`-separated, no leading `/`, no empty, `.` or
/// `..` component, no NUL, backslash or control character, bounded lengths.
pub fn check_relative_path(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(path.len()));
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute(path.to_owned()));
    }
    // Backslash: a separator on other systems, and never needed in an image.
    if path.chars().any(|c| c.is_control() || c == '\\') {
        return Err(PathError::ForbiddenChar(path.to_owned()));
    }
    for component in path.split('/') {
        match component {
            "" => return Err(PathError::EmptyComponent(path.to_owned())),
            "." | ".." => return Err(PathError::DotComponent(path.to_owned())),
            c if c.len() > MAX_COMPONENT_LEN => {
                return Err(PathError::ComponentTooLong(path.to_owned()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks a whole set of file paths: each one alone, then no duplicates and no path that is
/// both a file and the directory of another file (`a` and `a/b`).
pub fn check_path_set<'a>(paths: impl IntoIterator<Item = &'a str>) -> Result<(), PathError> {
    let mut files = HashSet::new();
    let mut dirs = HashSet::new();
    for path in paths {
        check_relative_path(path)?;
        if !files.insert(path) {
            return Err(PathError::Duplicate(path.to_owned()));
        }
        for (i, _) in path.match_indices('/') {
            dirs.insert(&path[..i]);
        }
    }
    if let Some(clash) = files.iter().find(|f| dirs.contains(*f)) {
        return Err(PathError::FileIsDirectory((*clash).to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_paths() {
        for p in [
            "disk.qcow2",
            "boot/vmlinuz",
            "etc/icbd/site.conf",
            "a.b/c-d_e",
        ] {
            check_relative_path(p).unwrap();
        }
        check_path_set(["boot/vmlinuz", "boot/initrd", "disk.img"]).unwrap();
    }

    #[test]
    fn rejects_escapes() {
        let cases = [
            ("", PathError::Empty),
            ("/etc/passwd", PathError::Absolute("/etc/passwd".into())),
            ("../x", PathError::DotComponent("../x".into())),
            ("a/../../x", PathError::DotComponent("a/../../x".into())),
            ("./x", PathError::DotComponent("./x".into())),
            ("a//b", PathError::EmptyComponent("a//b".into())),
            ("a/", PathError::EmptyComponent("a/".into())),
            ("a\\..\\b", PathError::ForbiddenChar("a\\..\\b".into())),
            ("a\0b", PathError::ForbiddenChar("a\0b".into())),
            ("a\nb", PathError::ForbiddenChar("a\nb".into())),
        ];
        for (path, err) in cases {
            assert_eq!(check_relative_path(path), Err(err), "{path:?}");
        }
        assert!(matches!(
            check_relative_path(&"a".repeat(MAX_COMPONENT_LEN + 1)),
            Err(PathError::ComponentTooLong(_))
        ));
        assert!(matches!(
            check_relative_path(&"a/".repeat(MAX_PATH_LEN)),
            Err(PathError::TooLong(_))
        ));
    }

    #[test]
    fn rejects_duplicate_and_file_directory_clash() {
        assert_eq!(
            check_path_set(["a", "a"]),
            Err(PathError::Duplicate("a".into()))
        );
        assert_eq!(
            check_path_set(["a", "a-b", "a/b"]),
            Err(PathError::FileIsDirectory("a".into()))
        );
    }

    #[test]
    fn image_names() {
        for ok in ["win11", "debian-12.4", "lab_A"] {
            check_image_name(ok).unwrap();
        }
        for bad in ["", ".", "..", ".partial", "-x", "a/b", "a b", "é"] {
            assert!(check_image_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_image_name(&"a".repeat(MAX_IMAGE_NAME_LEN + 1)).is_err());
    }
}
