//! Backend selection on this machine, and the kernel backend's answer where the kernel has
//! no WireGuard.

mod common;

use std::path::Path;

use common::*;
use fleet_gateway::{BackendKind, GatewayError, PrivateKey, create_device, select_backend};

/// Whether this kernel can create WireGuard links, asked of `ip` rather than our code.
fn kernel_has_wireguard(ns: &Netns) -> bool {
    Path::new("/sys/module/wireguard").exists()
        || ns.exec_ok(&["ip", "link", "add", "wgprobe", "type", "wireguard"])
}

#[tokio::test]
async fn auto_selection_follows_the_kernel_and_override_wins() {
    require_root();
    let ns = Netns::new("sel");
    let kernel = kernel_has_wireguard(&ns);
    let auto = select_backend(None, &ns.path()).await;
    let expected = if kernel {
        BackendKind::Kernel
    } else {
        BackendKind::Userspace
    };
    assert_eq!(auto, expected, "kernel WireGuard available: {kernel}");
    for forced in [BackendKind::Kernel, BackendKind::Userspace] {
        assert_eq!(select_backend(Some(forced), &ns.path()).await, forced);
    }
    // The probe leaves nothing behind.
    assert!(!ns.ip(&["link", "show"]).contains("fleetwgprobe"));
}

#[tokio::test]
async fn kernel_backend_without_kernel_wireguard_says_so() {
    require_root();
    let ns = Netns::new("kern");
    if kernel_has_wireguard(&ns) {
        // Where the kernel has it, the backend must work end to end instead.
        let dev = create_device(
            BackendKind::Kernel,
            config(
                &wg_name("k"),
                &ns,
                PrivateKey::generate(),
                "198.51.100.1/32",
            ),
        )
        .await
        .unwrap();
        assert_eq!(dev.backend(), BackendKind::Kernel);
        dev.set_peers(&[peer(
            PrivateKey::generate().public_key(),
            "192.0.2.2:51820",
            "198.51.100.2/32",
        )])
        .await
        .unwrap();
        assert_eq!(dev.stats().await.unwrap().len(), 1);
        assert!(ns.ip(&["route", "show"]).contains("198.51.100.2"));
        dev.delete().await.unwrap();
        return;
    }
    let err = create_device(
        BackendKind::Kernel,
        config(
            &wg_name("k"),
            &ns,
            PrivateKey::generate(),
            "198.51.100.1/32",
        ),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, GatewayError::KernelUnavailable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("userspace"), "{err}");
}

#[tokio::test]
async fn a_missing_netns_is_named_in_the_error() {
    let err = create_device(
        BackendKind::Userspace,
        fleet_gateway::DeviceConfig {
            name: "fgmissing".into(),
            netns: "/run/netns/fgw-does-not-exist".into(),
            underlay_netns: None,
            private_key: PrivateKey::generate(),
            listen_port: PORT,
            mtu: MTU,
            addresses: vec![],
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("fgw-does-not-exist"), "{err}");
}
