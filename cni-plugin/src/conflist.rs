//! Installer helper: adds fleet-cni to (and removes it from) the runtime's CNI config, so
//! `install.sh` needs no jq. Edits keep every other plugin and field, in order, and are atomic.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

pub const PLUGIN_TYPE: &str = "fleet-cni";
/// Extensions libcni loads, so the ones containerd and CRI-O consider.
const LOADED_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error("cannot read {path}: {source}; check the path and permissions")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON ({source}); fix or remove it, nothing was changed")]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} is not a CNI config: {why}; fix it, nothing was changed")]
    NotAConfig { path: PathBuf, why: String },
    #[error(
        "no CNI config (*.conf, *.conflist, *.json) in {dir}; install the primary CNI first, fleet-cni chains after it"
    )]
    NoConfig { dir: PathBuf },
    #[error("cannot write {path}: {source}; check permissions and free space")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What an edit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added,
    /// Already present; its socket was set to the requested one.
    Updated,
    Unchanged,
    Removed,
}

/// Appends `{"type":"fleet-cni","socket":..}` to a conflist's plugins unless present; when
/// present only the socket is brought in line. Pure: the caller writes the file.
pub fn add_entry(doc: &mut Value, socket: &str) -> Result<Change, String> {
    let plugins = plugins_mut(doc)?;
    if let Some(entry) = plugins.iter_mut().find(|p| is_ours(p)) {
        if entry.get("socket").and_then(Value::as_str) == Some(socket) {
            return Ok(Change::Unchanged);
        }
        entry
            .as_object_mut()
            .expect("is_ours checks object")
            .insert("socket".into(), json!(socket));
        return Ok(Change::Updated);
    }
    plugins.push(json!({ "type": PLUGIN_TYPE, "socket": socket }));
    Ok(Change::Added)
}

/// Drops every fleet-cni entry from a conflist's plugins.
pub fn remove_entry(doc: &mut Value) -> Result<Change, String> {
    let plugins = plugins_mut(doc)?;
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    Ok(if plugins.len() == before {
        Change::Unchanged
    } else {
        Change::Removed
    })
}

/// Turns a single-plugin `.conf` into the equivalent conflist: the plugin keeps all its fields.
pub fn conf_to_conflist(conf: Value) -> Result<Value, String> {
    let Value::Object(map) = conf else {
        return Err("it is not a JSON object".into());
    };
    if map.contains_key("plugins") {
        return Ok(Value::Object(map));
    }
    let name = map.get("name").cloned().ok_or("it has no \"name\"")?;
    let mut list = Map::new();
    if let Some(v) = map.get("cniVersion") {
        list.insert("cniVersion".into(), v.clone());
    }
    list.insert("name".into(), name);
    list.insert("plugins".into(), Value::Array(vec![Value::Object(map)]));
    Ok(Value::Object(list))
}

fn is_ours(p: &Value) -> bool {
    p.is_object() && p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn plugins_mut(doc: &mut Value) -> Result<&mut Vec<Value>, String> {
    let map = doc.as_object_mut().ok_or("it is not a JSON object")?;
    match map.get_mut("plugins") {
        Some(Value::Array(p)) => Ok(p),
        Some(_) => Err("\"plugins\" is not an array".into()),
        None => Err(
            "it has no \"plugins\" list (a single-plugin .conf? use --conf-dir to convert it)"
                .into(),
        ),
    }
}

fn read_json(path: &Path) -> Result<Value, ConflistError> {
    let bytes = fs::read(path).map_err(|source| ConflistError::Read {
        path: path.into(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ConflistError::Malformed {
        path: path.into(),
        source,
    })
}

/// Writes beside the target and renames, so the runtime never reads a half-written file. The
/// temporary name ends in `.tmp`, an extension libcni does not load.
fn write_json(path: &Path, doc: &Value, mode: u32) -> Result<(), ConflistError> {
    let err = |source| ConflistError::Write {
        path: path.into(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.fleet-cni.{}.tmp", std::process::id()));
    let mut text = serde_json::to_vec_pretty(doc).expect("JSON values always serialize");
    text.push(b'\n');
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644)
}

fn not_a_config(path: &Path) -> impl Fn(String) -> ConflistError + '_ {
    move |why| ConflistError::NotAConfig {
        path: path.into(),
        why,
    }
}

/// Adds fleet-cni to the conflist at `path`.
pub fn add_to_file(path: &Path, socket: &str) -> Result<Change, ConflistError> {
    let mut doc = read_json(path)?;
    let change = add_entry(&mut doc, socket).map_err(not_a_config(path))?;
    if change != Change::Unchanged {
        write_json(path, &doc, mode_of(path))?;
    }
    Ok(change)
}

/// Removes fleet-cni from the conflist at `path`.
pub fn remove_from_file(path: &Path) -> Result<Change, ConflistError> {
    let mut doc = read_json(path)?;
    let change = remove_entry(&mut doc).map_err(not_a_config(path))?;
    if change == Change::Removed {
        write_json(path, &doc, mode_of(path))?;
    }
    Ok(change)
}

/// The config file the runtime uses: the lexically first loaded file, as libcni sorts them.
pub fn active_config(dir: &Path) -> Result<PathBuf, ConflistError> {
    let mut files = config_files(dir)?;
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| ConflistError::NoConfig { dir: dir.into() })
}

fn config_files(dir: &Path) -> Result<Vec<PathBuf>, ConflistError> {
    let entries = fs::read_dir(dir).map_err(|source| ConflistError::Read {
        path: dir.into(),
        source,
    })?;
    Ok(entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| LOADED_EXTENSIONS.contains(&e))
        })
        .collect())
}

/// Adds fleet-cni to the active config in `dir`. A single-plugin config is first converted to
/// a `.conflist` of the same stem (which sorts in the same place); the original is kept as
/// `<name>.fleet-cni-orig`, an extension the runtime ignores. Returns the file edited.
pub fn add_in_dir(dir: &Path, socket: &str) -> Result<(PathBuf, Change), ConflistError> {
    let active = active_config(dir)?;
    let doc = read_json(&active)?;
    if doc.get("plugins").is_some() {
        return Ok((active.clone(), add_to_file(&active, socket)?));
    }
    let mut list = conf_to_conflist(doc).map_err(not_a_config(&active))?;
    let change = add_entry(&mut list, socket).map_err(not_a_config(&active))?;
    let target = active.with_extension("conflist");
    if target.exists() {
        return Err(ConflistError::NotAConfig {
            path: active.clone(),
            why: format!(
                "it is the active config but {} exists too; remove the one you do not use",
                target.display()
            ),
        });
    }
    write_json(&target, &list, mode_of(&active))?;
    let backup = PathBuf::from(format!("{}.fleet-cni-orig", active.display()));
    fs::rename(&active, &backup).map_err(|source| ConflistError::Write {
        path: active.clone(),
        source,
    })?;
    Ok((target, change))
}

/// Removes fleet-cni from every config in `dir` that lists it. Converted configs stay
/// conflists (equivalent to the original); the `.fleet-cni-orig` backup is left for the admin.
pub fn remove_in_dir(dir: &Path) -> Result<Vec<PathBuf>, ConflistError> {
    let mut files = config_files(dir)?;
    files.sort();
    let mut edited = Vec::new();
    for f in files {
        let Ok(mut doc) = read_json(&f) else { continue };
        if doc.get("plugins").is_none() {
            continue;
        }
        if remove_entry(&mut doc) == Ok(Change::Removed) {
            write_json(&f, &doc, mode_of(&f))?;
            edited.push(f);
        }
    }
    Ok(edited)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge_list() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "containerd-net",
            "x-unknown": {"a": 1},
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}, "x-p": true},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    #[test]
    fn add_keeps_others_and_is_idempotent() {
        let mut doc = bridge_list();
        assert_eq!(add_entry(&mut doc, "/run/s.sock"), Ok(Change::Added));
        let plugins = doc["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(
            plugins[..2],
            bridge_list()["plugins"].as_array().unwrap()[..]
        );
        assert_eq!(
            plugins[2],
            json!({"type": "fleet-cni", "socket": "/run/s.sock"})
        );
        assert_eq!(doc["x-unknown"], json!({"a": 1}));
        let keys: Vec<_> = doc.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["cniVersion", "name", "x-unknown", "plugins"]);

        let snapshot = doc.clone();
        assert_eq!(add_entry(&mut doc, "/run/s.sock"), Ok(Change::Unchanged));
        assert_eq!(doc, snapshot);
        assert_eq!(add_entry(&mut doc, "/other.sock"), Ok(Change::Updated));
        assert_eq!(doc["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(doc["plugins"][2]["socket"], "/other.sock");
    }

    #[test]
    fn remove_restores_the_original() {
        let mut doc = bridge_list();
        add_entry(&mut doc, "/s").unwrap();
        assert_eq!(remove_entry(&mut doc), Ok(Change::Removed));
        assert_eq!(doc, bridge_list());
        assert_eq!(remove_entry(&mut doc), Ok(Change::Unchanged));
    }

    #[test]
    fn not_a_conflist_is_refused() {
        assert!(add_entry(&mut json!([]), "/s").is_err());
        assert!(add_entry(&mut json!({"plugins": {}}), "/s").is_err());
        assert!(
            add_entry(&mut json!({"type": "bridge"}), "/s")
                .unwrap_err()
                .contains("--conf-dir")
        );
    }

    #[test]
    fn conf_converts_keeping_every_field() {
        let conf = json!({"cniVersion": "0.4.0", "name": "n", "type": "bridge", "x": [1]});
        let list = conf_to_conflist(conf.clone()).unwrap();
        assert_eq!(
            list,
            json!({"cniVersion": "0.4.0", "name": "n", "plugins": [conf]})
        );
        assert!(conf_to_conflist(json!({"type": "bridge"})).is_err());
    }
}
