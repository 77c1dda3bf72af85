//! The script library: `lib:<name>` in a device config names `<dir>/<name>.js`.
//!
//! On Kubernetes the directory is fed from ConfigMaps, which change files in place:
//! a file is read again when its modification time changed (checked at most every
//! two seconds per script), so a new version takes effect without a restart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{ScriptError, ScriptHash, hash};

/// How often a library file's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(2);

struct Loaded {
    script: Resolved,
    modified: Option<SystemTime>,
    checked: Instant,
}

/// A script ready to run: its source, the file name errors cite, its content hash
/// (computed once per source, not per message).
#[derive(Clone, Debug)]
pub struct Resolved {
    pub source: Arc<str>,
    pub name: String,
    pub hash: ScriptHash,
}

/// Inline scripts kept with their hash; past it the map starts over.
const INLINE_SCRIPTS: usize = 1024;

/// Resolves script references to sources.
#[derive(Default)]
pub struct Library {
    dir: Option<PathBuf>,
    loaded: Mutex<HashMap<String, Loaded>>,
    inline: Mutex<HashMap<String, Resolved>>,
}

impl Library {
    /// A library in `dir` (None: only inline scripts).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Library { dir, loaded: Mutex::default(), inline: Mutex::default() }
    }

    /// The source and file name of a reference: inline JavaScript, or `lib:<name>`.
    ///
    /// # Errors
    /// An unknown or unreadable library script, or a name that is not a plain name.
    pub fn resolve(&self, reference: &str) -> Result<Resolved, ScriptError> {
        let Some(name) = reference.strip_prefix("lib:") else {
            let mut inline = self.inline.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(script) = inline.get(reference) {
                return Ok(script.clone());
            }
            if inline.len() >= INLINE_SCRIPTS {
                inline.clear();
            }
            let script = Resolved {
                source: Arc::from(reference),
                name: "inline.js".to_owned(),
                hash: hash(reference),
            };
            inline.insert(reference.to_owned(), script.clone());
            return Ok(script);
        };
        let name = name.trim();
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || name.starts_with('.')
        {
            return Err(ScriptError::Library(format!("{name:?} is not a script name")));
        }
        let Some(dir) = &self.dir else {
            return Err(ScriptError::Library(format!("lib:{name} needs a script library (--scripts-dir)")));
        };
        let file = format!("{name}.js");
        let path = dir.join(&file);
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = loaded.get_mut(name) {
            if entry.checked.elapsed() < RECHECK {
                return Ok(entry.script.clone());
            }
            entry.checked = Instant::now();
            let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            if modified.is_some() && modified == entry.modified {
                return Ok(entry.script.clone());
            }
        }
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let source = std::fs::read_to_string(&path)
            .map_err(|e| ScriptError::Library(format!("lib:{name} ({}): {e}", path.display())))?;
        let script = Resolved { hash: hash(&source), source: source.into(), name: file };
        loaded.insert(name.to_owned(), Loaded { script: script.clone(), modified, checked: Instant::now() });
        Ok(script)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_and_library_scripts() {
        let dir = std::env::temp_dir().join(format!("tcpc-lib-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("meter.js"), "function decode(b) { return {}; }").unwrap();
        let library = Library::new(Some(dir.clone()));
        let script = library.resolve("lib:meter").unwrap();
        assert_eq!(
            (&*script.source, script.name.as_str()),
            ("function decode(b) { return {}; }", "meter.js")
        );
        assert_eq!(script.hash, hash("function decode(b) { return {}; }"));
        let inline = library.resolve("function decode(){}").unwrap();
        assert_eq!(
            (&*inline.source, inline.hash.as_str()),
            ("function decode(){}", hash("function decode(){}").as_str())
        );
        assert!(matches!(library.resolve("lib:../etc/passwd"), Err(ScriptError::Library(_))));
        assert!(matches!(library.resolve("lib:absent"), Err(ScriptError::Library(_))));
        assert!(matches!(Library::new(None).resolve("lib:meter"), Err(ScriptError::Library(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
