//! The reference daemon's built-in services, written against the public
//! [`Service`](crate::Service) trait exactly as a third-party service would be.

mod channel;
mod echo;
mod sink;
mod source;

pub use channel::Channel;
pub use echo::Echo;
pub use sink::Sink;
pub use source::Source;

use crate::Service;
use std::sync::Arc;

/// All built-in services.
pub fn all() -> Vec<Arc<dyn Service>> {
    vec![
        Arc::new(Echo),
        Arc::new(Sink),
        Arc::new(Source),
        Arc::new(Channel::default()),
    ]
}
