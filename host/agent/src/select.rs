//! Which files of a commit are manifests: agentk's glob rules and limits.
//!
//! - Globs have doublestar semantics: one leading `/` is stripped, `*` and `?` stay within a
//!   path component, `**` as a whole component matches zero or more directories, `{a,b}`
//!   alternatives and `[a-z]` classes work, `\` escapes.
//! - Files inside any directory whose name starts with `.` are skipped (so `.gitlab/` is
//!   never synced); dot-files at the top level are not.
//! - A file matched by several globs is taken once. (agentk failed the sync with "path
//!   visited more than once"; overlapping globs are common and harmless, so sluice accepts
//!   them.)
//! - A symlink matched by a glob is an error: it is never followed.
//! - Limits, agentk's by default: 1000 files, 5 MiB per file, 20 MiB in total.

use globset::{GlobBuilder, GlobSetBuilder};

use crate::source::{self, EntryKind, Snapshot, TreeEntry};

/// A selection that failed. Not retryable: the commit or the configuration must change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A glob does not parse.
    #[error("failed to parse glob {glob:?}: {message}")]
    InvalidGlob {
        /// The glob as configured.
        glob: String,
        /// What is wrong with it.
        message: String,
    },
    /// A selected path is a symlink.
    #[error("{path}: is a symbolic link; sluice never follows symlinks, commit the file itself")]
    Symlink {
        /// The path.
        path: String,
    },
    /// Two selected files have names that read the same as text (names that are not
    /// UTF-8 are read with U+FFFD for each invalid byte): one would hide the other, and
    /// its objects would be pruned.
    #[error(
        "{path}: two files have this name once read as UTF-8 (their names hold bytes that are not UTF-8); rename them"
    )]
    AmbiguousPath {
        /// The path as read.
        path: String,
    },
    /// More files matched than allowed.
    #[error("maximum number of files limit reached: {limit}")]
    TooManyFiles {
        /// The limit.
        limit: usize,
    },
    /// One file is larger than allowed.
    #[error("{path}: file is {size} bytes, the limit per file is {limit}")]
    FileTooBig {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The selected files together are larger than allowed.
    #[error("selected files exceed the total size limit of {limit} bytes (at {path})")]
    TotalTooBig {
        /// The file that crossed the limit.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// Reading from git failed.
    #[error(transparent)]
    Source(#[from] source::Error),
    /// Reading a local file failed.
    #[error("failed to read {path}: {message}")]
    Io {
        /// The path.
        path: String,
        /// Cause.
        message: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Selection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum number of selected files. Default 1000.
    pub max_files: usize,
    /// Maximum size of one file in bytes. Default 5 MiB.
    pub max_file_bytes: u64,
    /// Maximum total size in bytes. Default 20 MiB.
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_files: 1000,
            max_file_bytes: 5 << 20,
            max_total_bytes: 20 << 20,
        }
    }
}

/// A selected file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedFile {
    /// Repository-relative path.
    pub path: String,
    /// Its content.
    pub bytes: Vec<u8>,
    /// The renderer whose output this is (`render`), with its version; `None` for a file
    /// of the repository.
    pub renderer: Option<sluice_model::object::Name>,
}

/// Something with files: a commit ([`Snapshot`]) or, for the CLI, a directory.
pub trait FileTree {
    /// All entries, in a stable order.
    fn entries(&self) -> &[TreeEntry];
    /// The size of the entry's content.
    fn size(&self, entry: &TreeEntry) -> Result<u64>;
    /// The entry's content.
    fn read(&self, entry: &TreeEntry) -> Result<Vec<u8>>;
}

impl FileTree for Snapshot {
    fn entries(&self) -> &[TreeEntry] {
        Snapshot::entries(self)
    }
    fn size(&self, entry: &TreeEntry) -> Result<u64> {
        Ok(self.blob_size(&entry.id)?)
    }
    fn read(&self, entry: &TreeEntry) -> Result<Vec<u8>> {
        Ok(self.read_blob(&entry.id)?)
    }
}

/// A directory on disk as a [`FileTree`] (for `sluice render DIR`). Symlinks are listed as
/// symlinks, never followed; directories whose name starts with `.` are not walked (their
/// files would be skipped anyway).
#[derive(Debug)]
pub struct Dir {
    root: std::path::PathBuf,
    entries: Vec<TreeEntry>,
}

impl Dir {
    /// Lists `root` recursively.
    ///
    /// # Errors
    /// I/O errors, naming the path.
    pub fn walk(root: &std::path::Path) -> std::io::Result<Dir> {
        let mut entries = Vec::new();
        let mut stack = vec![std::path::PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = root.join(&rel);
            let mut names: Vec<_> = std::fs::read_dir(&dir)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?
                .collect::<Result<_, _>>()?;
            names.sort_by_key(|e| e.file_name());
            for e in names {
                let name = e.file_name().to_string_lossy().into_owned();
                let path = rel.join(&name);
                let meta = std::fs::symlink_metadata(e.path())?;
                let text = path.to_string_lossy().replace('\\', "/");
                if meta.file_type().is_symlink() {
                    entries.push(TreeEntry {
                        path: text.clone(),
                        kind: EntryKind::Symlink,
                        id: text,
                    });
                } else if meta.is_dir() {
                    if !name.starts_with('.') {
                        stack.push(path);
                    }
                } else if meta.is_file() {
                    entries.push(TreeEntry {
                        path: text.clone(),
                        kind: EntryKind::File,
                        id: text,
                    });
                }
            }
        }
        Ok(Dir {
            root: root.to_path_buf(),
            entries,
        })
    }
}

impl FileTree for Dir {
    fn entries(&self) -> &[TreeEntry] {
        &self.entries
    }
    fn size(&self, entry: &TreeEntry) -> Result<u64> {
        let path = self.root.join(&entry.id);
        std::fs::symlink_metadata(&path)
            .map(|m| m.len())
            .map_err(|e| Error::Io {
                path: entry.path.clone(),
                message: e.to_string(),
            })
    }
    fn read(&self, entry: &TreeEntry) -> Result<Vec<u8>> {
        std::fs::read(self.root.join(&entry.id)).map_err(|e| Error::Io {
            path: entry.path.clone(),
            message: e.to_string(),
        })
    }
}

/// The files of `tree` matched by `globs`, sorted by path.
///
/// # Errors
/// See [`Error`]; the first violated rule wins, nothing is returned partially.
pub fn select(
    tree: &impl FileTree,
    globs: &[String],
    limits: &Limits,
) -> Result<Vec<SelectedFile>> {
    let matcher = build_matcher(globs)?;
    let mut chosen: Vec<&TreeEntry> = tree
        .entries()
        .iter()
        .filter(|e| !in_hidden_dir(&e.path) && matcher.is_match(&e.path))
        .collect();
    chosen.sort_by(|a, b| a.path.cmp(&b.path));
    if let Some(pair) = chosen.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(Error::AmbiguousPath {
            path: pair[0].path.clone(),
        });
    }

    let mut files = Vec::new();
    let mut total = 0u64;
    for entry in chosen {
        match entry.kind {
            EntryKind::Symlink => {
                return Err(Error::Symlink {
                    path: entry.path.clone(),
                });
            }
            // A submodule is a pointer to another repository; there is nothing to read.
            EntryKind::Submodule => continue,
            EntryKind::File => {}
        }
        if files.len() == limits.max_files {
            return Err(Error::TooManyFiles {
                limit: limits.max_files,
            });
        }
        let size = tree.size(entry)?;
        if size > limits.max_file_bytes {
            return Err(Error::FileTooBig {
                path: entry.path.clone(),
                size,
                limit: limits.max_file_bytes,
            });
        }
        total += size;
        if total > limits.max_total_bytes {
            return Err(Error::TotalTooBig {
                path: entry.path.clone(),
                limit: limits.max_total_bytes,
            });
        }
        files.push(SelectedFile {
            path: entry.path.clone(),
            bytes: tree.read(entry)?,
            renderer: None,
        });
    }
    Ok(files)
}

fn build_matcher(globs: &[String]) -> Result<globset::GlobSet> {
    let mut set = GlobSetBuilder::new();
    for glob in globs {
        let pattern = glob.strip_prefix('/').unwrap_or(glob);
        let g = GlobBuilder::new(pattern)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| Error::InvalidGlob {
                glob: glob.clone(),
                message: e.kind().to_string(),
            })?;
        set.add(g);
    }
    set.build().map_err(|e| Error::InvalidGlob {
        glob: globs.join(", "),
        message: e.to_string(),
    })
}

/// True if a directory (not the file itself) on the path starts with `.`.
fn in_hidden_dir(path: &str) -> bool {
    let mut parts: Vec<&str> = path.split('/').collect();
    parts.pop();
    parts.iter().any(|p| p.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<TreeEntry>);
    impl FileTree for Mem {
        fn entries(&self) -> &[TreeEntry] {
            &self.0
        }
        fn size(&self, e: &TreeEntry) -> Result<u64> {
            Ok(e.id.len() as u64)
        }
        fn read(&self, e: &TreeEntry) -> Result<Vec<u8>> {
            Ok(e.id.as_bytes().to_vec())
        }
    }

    fn tree(paths: &[&str]) -> Mem {
        Mem(paths
            .iter()
            .map(|p| TreeEntry {
                path: p.to_string(),
                kind: EntryKind::File,
                id: format!("content of {p}"),
            })
            .collect())
    }

    fn selected(globs: &[&str], paths: &[&str]) -> Vec<String> {
        let globs: Vec<String> = globs.iter().map(|s| s.to_string()).collect();
        select(&tree(paths), &globs, &Limits::default())
            .expect("select")
            .into_iter()
            .map(|f| f.path)
            .collect()
    }

    #[test]
    fn doublestar_semantics() {
        let all = [
            "a.yaml",
            "x/b.yaml",
            "x/y/c.yml",
            "d.json",
            "e.txt",
            "x/f.txt",
        ];
        // (globs, expected) — one case per line.
        let cases: &[(&[&str], &[&str])] = &[
            (
                &["**/*.{yaml,yml,json}"],
                &["a.yaml", "d.json", "x/b.yaml", "x/y/c.yml"],
            ),
            (&["*.yaml"], &["a.yaml"]),
            (&["/x/*.yaml"], &["x/b.yaml"]),
            (&["x/**/*.yml"], &["x/y/c.yml"]),
            (&["x/**"], &["x/b.yaml", "x/f.txt", "x/y/c.yml"]),
            (&["?.json"], &["d.json"]),
            (&["[a-b].yaml"], &["a.yaml"]),
            (&["*.yaml", "**/*.yaml"], &["a.yaml", "x/b.yaml"]),
        ];
        for (globs, want) in cases {
            assert_eq!(selected(globs, &all), *want, "globs {globs:?}");
        }
    }

    #[test]
    fn hidden_directories_are_skipped_but_top_level_dotfiles_are_not() {
        let got = selected(
            &["**/*.yaml"],
            &[
                ".gitlab/agents/a/config.yaml",
                "x/.hidden/a.yaml",
                ".top.yaml",
                "ok.yaml",
            ],
        );
        assert_eq!(got, [".top.yaml", "ok.yaml"]);
    }

    #[test]
    fn symlinks_are_errors() {
        let mut t = tree(&["a.yaml"]);
        t.0.push(TreeEntry {
            path: "link.yaml".into(),
            kind: EntryKind::Symlink,
            id: "a.yaml".into(),
        });
        let e = select(&t, &["*.yaml".into()], &Limits::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "link.yaml: is a symbolic link; sluice never follows symlinks, commit the file itself"
        );
    }

    #[test]
    fn limits_are_enforced() {
        let t = tree(&["a.yaml", "b.yaml", "c.yaml"]);
        let globs = ["*.yaml".to_string()];
        let few = Limits {
            max_files: 2,
            ..Limits::default()
        };
        assert_eq!(
            select(&t, &globs, &few).unwrap_err().to_string(),
            "maximum number of files limit reached: 2"
        );
        let small = Limits {
            max_file_bytes: 5,
            ..Limits::default()
        };
        assert!(matches!(
            select(&t, &globs, &small),
            Err(Error::FileTooBig { .. })
        ));
        let total = Limits {
            max_total_bytes: 30,
            ..Limits::default()
        };
        assert!(matches!(
            select(&t, &globs, &total),
            Err(Error::TotalTooBig { .. })
        ));
    }

    #[test]
    fn names_that_read_the_same_are_refused_not_merged() {
        // `a\xff.yaml` and `a\xfe.yaml` both read as `a\u{FFFD}.yaml`: before, one was
        // dropped and its objects pruned.
        let t = tree(&["a\u{FFFD}.yaml", "a\u{FFFD}.yaml", "b.yaml"]);
        assert_eq!(
            select(&t, &["*.yaml".to_string()], &Limits::default())
                .unwrap_err()
                .to_string(),
            "a\u{FFFD}.yaml: two files have this name once read as UTF-8 (their names hold bytes that are not UTF-8); rename them"
        );
    }

    #[test]
    fn invalid_glob_is_quoted() {
        let e = select(&tree(&[]), &["a/{b".into()], &Limits::default()).unwrap_err();
        assert!(
            e.to_string().starts_with("failed to parse glob \"a/{b\""),
            "{e}"
        );
    }
}
