//! The command line when fleet-cni is not run as a CNI plugin (CNI_COMMAND unset): the
//! installer helper `conflist add|remove`, `--version` and `--help`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::SUPPORTED_VERSIONS;
use crate::conflist::{self, Change};

const USAGE: &str = "\
fleet-cni: fleetboard's chained CNI plugin (run by the container runtime with CNI_COMMAND set).

Installer helper:
  fleet-cni conflist add    (--file FILE | --conf-dir DIR) [--socket PATH]
  fleet-cni conflist remove (--file FILE | --conf-dir DIR)
  fleet-cni --version

  --file FILE     edit this .conflist
  --conf-dir DIR  add: edit the runtime's active config in DIR (lexically first *.conf,
                  *.conflist, *.json), converting a single-plugin .conf into a .conflist;
                  remove: edit every config in DIR that lists fleet-cni
  --socket PATH   fleet-nri's node API socket to write into the entry
";

#[derive(Debug, PartialEq, Eq)]
enum Target {
    File(PathBuf),
    Dir(PathBuf),
}

#[derive(Debug, PartialEq, Eq)]
enum Cli {
    Help,
    Version,
    Add { target: Target, socket: String },
    Remove { target: Target },
}

fn parse(args: Vec<OsString>) -> Result<Cli, String> {
    let args: Vec<String> = args
        .into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|a| format!("argument {a:?} is not UTF-8"))
        })
        .collect::<Result<_, _>>()?;
    let mut it = args.iter().map(String::as_str);
    let first = it.next();
    match first {
        None | Some("-h" | "--help" | "help") => return Ok(Cli::Help),
        Some("-V" | "--version" | "version") => return Ok(Cli::Version),
        Some("conflist") => {}
        Some(other) => return Err(format!("unknown command {other:?}")),
    }
    // The verb first: a wrong one is named before any flag is looked at.
    let verb = match it.next() {
        None => return Err("conflist needs a command: add or remove".into()),
        Some(v @ ("add" | "remove")) => v,
        Some(other) if other.starts_with('-') => {
            return Err(format!(
                "conflist needs add or remove before its flags, got {other:?}"
            ));
        }
        Some(other) => {
            return Err(format!(
                "unknown conflist command {other:?}; expected add or remove"
            ));
        }
    };
    let (mut file, mut dir, mut socket) = (None, None, None);
    while let Some(arg) = it.next() {
        let slot = match arg {
            "--file" => &mut file,
            "--conf-dir" => &mut dir,
            "--socket" => &mut socket,
            other if other.starts_with('-') => {
                return Err(format!("unknown flag {other:?} for conflist {verb}"));
            }
            other => {
                return Err(format!(
                    "unexpected argument {other:?}: conflist {verb} takes only flags"
                ));
            }
        };
        if slot.is_some() {
            return Err(format!("{arg} is given twice; give it once"));
        }
        // A flag in a value's place means the value was forgotten.
        match it.next() {
            Some(v) if !v.starts_with("--") => *slot = Some(v.to_string()),
            _ => return Err(format!("{arg} needs a value")),
        }
    }
    let target = match (file, dir) {
        (Some(f), None) => Target::File(f.into()),
        (None, Some(d)) => Target::Dir(d.into()),
        _ => {
            return Err(format!(
                "conflist {verb} needs exactly one of --file and --conf-dir"
            ));
        }
    };
    match verb {
        "add" => Ok(Cli::Add {
            target,
            socket: socket.unwrap_or_else(|| fleet_proto::node::DEFAULT_SOCKET.to_string()),
        }),
        _ if socket.is_none() => Ok(Cli::Remove { target }),
        _ => Err("remove takes no --socket".into()),
    }
}

/// Runs the command line; messages for people go to stdout, errors to stderr.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let cli = match parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleet-cni: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let outcome = match cli {
        Cli::Help => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Cli::Version => {
            println!(
                "fleet-cni {} (CNI {})",
                env!("CARGO_PKG_VERSION"),
                SUPPORTED_VERSIONS.join(", ")
            );
            return ExitCode::SUCCESS;
        }
        Cli::Add {
            target: Target::File(f),
            socket,
        } => conflist::add_to_file(&f, &socket).map(|c| describe(&c, &f)),
        Cli::Add {
            target: Target::Dir(d),
            socket,
        } => conflist::add_in_dir(&d, &socket).map(|(f, c)| describe(&c, &f)),
        Cli::Remove {
            target: Target::File(f),
        } => conflist::remove_from_file(&f).map(|c| describe(&c, &f)),
        Cli::Remove {
            target: Target::Dir(d),
        } => conflist::remove_in_dir(&d).map(|files| {
            if files.is_empty() {
                format!("fleet-cni is in no config in {}", d.display())
            } else {
                let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                format!("removed fleet-cni from {}", names.join(", "))
            }
        }),
    };
    match outcome {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleet-cni: {e}");
            ExitCode::FAILURE
        }
    }
}

fn describe(change: &Change, file: &std::path::Path) -> String {
    let f = file.display();
    match change {
        Change::Added => format!("added fleet-cni to {f}"),
        Change::Updated => format!("updated the fleet-cni socket in {f}"),
        Change::Unchanged => format!("{f} already as wanted; nothing changed"),
        Change::Removed => format!("removed fleet-cni from {f}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Cli, String> {
        parse(args.iter().map(OsString::from).collect())
    }

    #[test]
    fn parses_the_installer_commands() {
        assert_eq!(p(&[]), Ok(Cli::Help));
        assert_eq!(p(&["--version"]), Ok(Cli::Version));
        assert_eq!(
            p(&["conflist", "add", "--file", "/f", "--socket", "/s"]),
            Ok(Cli::Add {
                target: Target::File("/f".into()),
                socket: "/s".into()
            })
        );
        assert_eq!(
            p(&["conflist", "remove", "--conf-dir", "/d"]),
            Ok(Cli::Remove {
                target: Target::Dir("/d".into())
            })
        );
        assert!(p(&["conflist", "add"]).is_err());
        assert!(p(&["conflist", "add", "--file", "/f", "--conf-dir", "/d"]).is_err());
        assert!(p(&["conflist", "add", "--file"]).is_err());
        assert!(p(&["frob"]).is_err());
    }

    /// Each mistake is named: the unknown word, the flag, the missing value.
    #[test]
    fn mistakes_are_named() {
        let err = |args: &[&str]| p(args).unwrap_err();
        assert_eq!(
            err(&["conflist", "frob"]),
            "unknown conflist command \"frob\"; expected add or remove"
        );
        assert_eq!(
            err(&["conflist", "frob", "--file", "/f"]),
            "unknown conflist command \"frob\"; expected add or remove"
        );
        assert_eq!(
            err(&["conflist"]),
            "conflist needs a command: add or remove"
        );
        assert_eq!(
            err(&["conflist", "--file", "/f", "add"]),
            "conflist needs add or remove before its flags, got \"--file\""
        );
        assert_eq!(err(&["frob"]), "unknown command \"frob\"");
        assert_eq!(
            err(&["conflist", "add", "extra", "--file", "/f"]),
            "unexpected argument \"extra\": conflist add takes only flags"
        );
        assert_eq!(
            err(&["conflist", "add", "--file=/f"]),
            "unknown flag \"--file=/f\" for conflist add"
        );
        assert_eq!(
            err(&["conflist", "add", "--file", "--socket", "/s"]),
            "--file needs a value"
        );
        assert_eq!(
            err(&["conflist", "add", "--file", "/f", "--file", "/g"]),
            "--file is given twice; give it once"
        );
        assert_eq!(
            err(&["conflist", "add"]),
            "conflist add needs exactly one of --file and --conf-dir"
        );
        assert_eq!(
            err(&["conflist", "remove", "--file", "/f", "--socket", "/s"]),
            "remove takes no --socket"
        );
    }
}
