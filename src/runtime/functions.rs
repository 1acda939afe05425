//! The table of functions a slave runs for masters.
//!
//! This module owns [`RemoteTable`] (named async functions, registered by the program
//! that embeds a slave), their result and error types, and how an error and its causes
//! become the one line a master receives.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

/// The error of a remote function: any error type converts into it with `?` (`anyhow`'s
/// included), and so does a message (`Err("why".into())`). The master receives its text
/// with its causes.
pub type RemoteError = Box<dyn std::error::Error + Send + Sync>;

/// The result type of remote functions.
pub type RemoteResult = Result<Value, RemoteError>;

/// An error and its causes on one line (`outer: cause: root cause`), each cause once:
/// a cause whose text the line already holds (an error that prints its source) is not
/// repeated.
///
/// ```
/// let e = std::io::Error::other("disk on fire");
/// assert_eq!(localnet::error_text(&e), "disk on fire");
/// ```
pub fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}
type BoxedFn =
    Arc<dyn Fn(Value) -> Pin<Box<dyn Future<Output = RemoteResult> + Send>> + Send + Sync>;

/// Named async functions a slave can run for a master.
///
/// ```
/// use localnet::RemoteTable;
/// use serde_json::{json, Value};
/// let table = RemoteTable::new().register("square", |x: Value| async move {
///     let n = x.as_i64().ok_or("square wants an integer")?;
///     Ok(json!(n * n))
/// });
/// assert!(table.contains("square"));
/// ```
#[derive(Clone, Default)]
pub struct RemoteTable {
    functions: HashMap<String, BoxedFn>,
}

impl RemoteTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `f` under `name` (replacing any earlier one).
    pub fn register<F, Fut>(mut self, name: &str, f: F) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = RemoteResult> + Send + 'static,
    {
        self.functions
            .insert(name.to_string(), Arc::new(move |v| Box::pin(f(v))));
        self
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.functions.contains_key(name)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.functions.keys().cloned().collect();
        names.sort();
        names
    }

    /// Starts `name(arg)`; `None` if no such function.
    pub(crate) fn start(
        &self,
        name: &str,
        arg: Value,
    ) -> Option<Pin<Box<dyn Future<Output = RemoteResult> + Send>>> {
        self.functions.get(name).map(|f| f(arg))
    }
}

impl fmt::Debug for RemoteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteTable")
            .field("functions", &self.names())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn remote_functions_need_no_anyhow_and_errors_keep_their_causes() {
        let table = RemoteTable::new()
            .register("parse", |v: Value| async move {
                let text = v.as_str().ok_or("parse wants a string")?;
                Ok(json!(text.parse::<i64>()?))
            })
            .register("wrapped", |_| async move {
                let inner = std::io::Error::other("disk on fire");
                Err(anyhow::Error::new(inner).context("saving the result"))?
            });
        let run = |name: &str, arg: Value| table.start(name, arg).unwrap();
        assert_eq!(run("parse", json!("42")).await.unwrap(), json!(42));
        let err = run("parse", json!(1)).await.unwrap_err();
        assert_eq!(error_text(err.as_ref()), "parse wants a string");
        let err = run("parse", json!("x")).await.unwrap_err();
        assert_eq!(error_text(err.as_ref()), "invalid digit found in string");
        let err = run("wrapped", Value::Null).await.unwrap_err();
        assert_eq!(error_text(err.as_ref()), "saving the result: disk on fire");
    }

    #[tokio::test]
    async fn table_runs_functions() {
        let table = RemoteTable::new().register("double", |v: Value| async move {
            Ok(json!(v.as_i64().unwrap_or(0) * 2))
        });
        assert_eq!(
            table.start("double", json!(21)).unwrap().await.unwrap(),
            json!(42)
        );
        assert!(table.start("missing", json!(0)).is_none());
    }
}
