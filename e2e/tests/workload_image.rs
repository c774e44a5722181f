//! What the busybox workload image offers pod-to-pod tests: HTTP (httpd/wget), TCP (nc) and
//! ICMP (ping, unprivileged container), between two pods on one bridge.

use std::time::Duration;

use fleet_e2e::{BridgeNetwork, Containerd, ContainerdOpts, PodSpec, require_root};

const EXEC: Duration = Duration::from_secs(15);

#[test]
fn pods_reach_each_other_over_http_tcp_and_icmp() {
    require_root("pods_reach_each_other_over_http_tcp_and_icmp");
    let containerd = Containerd::start(ContainerdOpts::new("workload")).unwrap();
    BridgeNetwork::new("podnet", "fe2e-br2", "10.244.9.0/24")
        .write_to(&containerd)
        .unwrap();
    let cri = containerd.cri().unwrap();
    cri.wait_network_ready(Duration::from_secs(10)).unwrap();
    let (server_pod, server) = cri.run_busybox_pod(&PodSpec::new("server")).unwrap();
    let (_, client) = cri.run_busybox_pod(&PodSpec::new("client")).unwrap();
    let server_ip = cri.pod_ip(&server_pod).unwrap();

    let run = |id: &str, cmd: &[&str]| {
        let out = cri.exec_sync(id, cmd, EXEC).unwrap();
        assert!(out.success(), "{cmd:?} failed: {out:?}");
        out.stdout
    };
    run(
        &server,
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo fleet-ok > /www/index.html && httpd -p 8080 -h /www",
        ],
    );
    run(
        &server,
        &["sh", "-c", "nc -l -p 9000 -e echo tcp-ok >/dev/null 2>&1 &"],
    );

    let body = run(
        &client,
        &[
            // Not `wget -T`: Debian's busybox-static 1.35 wget segfaults on it.
            "timeout",
            "5",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{server_ip}:8080/"),
        ],
    );
    assert_eq!(body.trim(), "fleet-ok");

    let tcp = fleet_e2e::poll_until("nc answer from server", Duration::from_secs(10), || {
        let out = cri
            .exec_sync(
                &client,
                &["sh", "-c", &format!("nc -w 2 {server_ip} 9000 </dev/null")],
                EXEC,
            )
            .ok()?;
        out.stdout.contains("tcp-ok").then_some(out.stdout)
    })
    .unwrap();
    assert!(tcp.contains("tcp-ok"));

    let ping = run(&client, &["ping", "-c", "1", "-W", "2", &server_ip]);
    assert!(ping.contains("1 packets received"), "{ping}");
}

#[tokio::test]
async fn async_client_works_inside_a_runtime() {
    require_root("async_client_works_inside_a_runtime");
    let containerd = Containerd::start(ContainerdOpts::new("async")).unwrap();
    BridgeNetwork::new("podnet", "fe2e-br3", "10.244.10.0/24")
        .write_to(&containerd)
        .unwrap();
    let cri = containerd.cri_async().await.unwrap();
    cri.wait_network_ready(Duration::from_secs(10))
        .await
        .unwrap();
    let (_, container) = cri.run_busybox_pod(&PodSpec::new("a")).await.unwrap();
    let out = cri
        .exec_sync(&container, &["hostname"], EXEC)
        .await
        .unwrap();
    assert_eq!(out.stdout.trim(), "a");
}
