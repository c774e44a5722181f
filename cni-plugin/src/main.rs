//! `fleet-cni`: a CNI plugin when the runtime sets CNI_COMMAND, the installer helper otherwise.

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        fleet_cni::plugin_main()
    } else {
        fleet_cni::cli::main(std::env::args_os().skip(1).collect())
    }
}
