//! A client whose every hub address fails names each address's failure, not only the last
//! one tried (two closed local ports: refused at once, no network needed).

use fleet_hub_api::tls::CaHash;
use fleet_hub_api::wire::Credential;
use fleet_hub_api::{ClientOptions, HubClient, HubError};

/// A port on 127.0.0.1 that nothing listens on (bound, then closed).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn every_unreachable_address_is_named_with_its_reason() {
    let (a, b) = (
        format!("127.0.0.1:{}", closed_port()),
        format!("127.0.0.1:{}", closed_port()),
    );
    let client = HubClient::new(
        [a.clone(), b.clone()],
        CaHash([7; 32]),
        ClientOptions::default(),
    )
    .unwrap()
    .with_credential(Credential::parse(&format!("m.aa.{}", "c".repeat(64))).unwrap());
    for result in [
        client.list().await.map(|_| ()),
        client.probe().await.map(|_| ()),
    ] {
        match result {
            Err(HubError::Unreachable { endpoints, errors }) => {
                assert_eq!(endpoints, format!("{a},{b}"));
                assert!(
                    errors.contains(&format!("{a}: ")) && errors.contains(&format!("{b}: ")),
                    "{errors}"
                );
                assert!(errors.contains("; "), "{errors}");
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }
}
