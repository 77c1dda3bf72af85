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

use super::ScriptError;

/// How often a library file's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(2);

struct Loaded {
    source: Arc<str>,
    modified: Option<SystemTime>,
    checked: Instant,
}

/// Resolves script references to sources.
#[derive(Default)]
pub struct Library {
    dir: Option<PathBuf>,
    loaded: Mutex<HashMap<String, Loaded>>,
}

impl Library {
    /// A library in `dir` (None: only inline scripts).
    pub fn new(dir: Option<PathBuf>) -> Self {
        Library { dir, loaded: Mutex::default() }
    }

    /// The source and file name of a reference: inline JavaScript, or `lib:<name>`.
    ///
    /// # Errors
    /// An unknown or unreadable library script, or a name that is not a plain name.
    pub fn resolve(&self, reference: &str) -> Result<(Arc<str>, String), ScriptError> {
        let Some(name) = reference.strip_prefix("lib:") else {
            return Ok((Arc::from(reference), "inline.js".to_owned()));
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
                return Ok((entry.source.clone(), file));
            }
            entry.checked = Instant::now();
            let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            if modified.is_some() && modified == entry.modified {
                return Ok((entry.source.clone(), file));
            }
        }
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let source: Arc<str> = std::fs::read_to_string(&path)
            .map_err(|e| ScriptError::Library(format!("lib:{name} ({}): {e}", path.display())))?
            .into();
        loaded.insert(name.to_owned(), Loaded { source: source.clone(), modified, checked: Instant::now() });
        Ok((source, file))
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
        let (source, name) = library.resolve("lib:meter").unwrap();
        assert_eq!((&*source, name.as_str()), ("function decode(b) { return {}; }", "meter.js"));
        assert_eq!(&*library.resolve("function decode(){}").unwrap().0, "function decode(){}");
        assert!(matches!(library.resolve("lib:../etc/passwd"), Err(ScriptError::Library(_))));
        assert!(matches!(library.resolve("lib:absent"), Err(ScriptError::Library(_))));
        assert!(matches!(Library::new(None).resolve("lib:meter"), Err(ScriptError::Library(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
