//! Both store backends, and one test per backend from one async test function.

use billsync::store::StoreOptions;

use super::{postgres_store_with, sqlite_store, sqlite_store_with, TestStore};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// A fresh, migrated store, or `None` (reported) when this backend is not configured.
    pub async fn store(self, test: &str) -> Option<TestStore> {
        match self {
            Self::Sqlite => Some(sqlite_store().await),
            Self::Postgres => self.store_with(test, &StoreOptions::new(20)).await,
        }
    }

    /// [`store`](Self::store), opened with `options` (a plans file, a push debounce).
    pub async fn store_with(self, test: &str, options: &StoreOptions) -> Option<TestStore> {
        match self {
            Self::Sqlite => Some(sqlite_store_with(options).await),
            Self::Postgres => postgres_store_with(test, options).await,
        }
    }
}

/// Generates one test per backend from `async fn name(backend: Backend)`.
#[macro_export]
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Postgres).await
                }
            )*
        }
    };
}
