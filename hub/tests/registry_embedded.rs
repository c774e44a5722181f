//! The registry suite on the embedded store (one process: both handles are the same store).

mod common;

use std::sync::Arc;

use fleet_hub::store::{EmbeddedStore, Store};

async fn setup() -> (Arc<dyn Store>, Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).await.unwrap());
    (store.clone(), store, dir)
}

registry_suite!(setup);
