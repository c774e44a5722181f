//! The registry suite on a real etcd; the "replica" is a second, independent connection, as
//! a second hub replica would have.

mod common;

use std::sync::Arc;

use common::etcd::EtcdServer;
use fleet_hub::store::Store;

async fn setup() -> (Arc<dyn Store>, Arc<dyn Store>, EtcdServer) {
    let etcd = EtcdServer::start().await;
    let one: Arc<dyn Store> = Arc::new(etcd.store("/fleetboard/").await);
    let two: Arc<dyn Store> = Arc::new(etcd.store("/fleetboard/").await);
    (one, two, etcd)
}

registry_suite!(setup);
