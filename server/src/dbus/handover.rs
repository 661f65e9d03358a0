//! The broker's side of handing a session to a provider: the
//! `AcceptSession` call made for each `OpenSession` of a provided service,
//! the calls waiting for their provider's answer, and how an answer (or its
//! absence) becomes the client's reply.
//!
//! Nothing here waits: the call is queued on the bus, the answer arrives as
//! any other message, and the main loop expires what is overdue.

use crate::log_bounds::{cut, LOGGED_ERROR, LOGGED_STRING};
use crate::names::Names;
use crate::service::Caller;
use crate::sessions::Handover;
use dbus::message::MessageType;
use dbus::Message;
use shmlink_interfaces::{
    error, member, AcceptSession, AcceptSessionArgs, DBUS_NAME, PROVIDER_INTERFACE,
};
use std::time::Instant;

/// An `OpenSession` waiting for its provider's `AcceptSession` answer.
pub(super) struct Pending {
    /// Whom to answer (the call itself is not kept).
    pub call: ReplyTo,
    /// The session (its entry in the table holds the rest).
    pub id: u64,
    /// The provider's unique name: the only sender whose answer counts.
    pub provider: String,
    /// The client.
    pub owner: Caller,
    /// When the provider's time is up.
    pub deadline: Instant,
}

/// An `OpenSession` whose `AcceptSession` call waits for its provider to
/// answer earlier ones (see [`super::unanswered`]).
pub(super) struct Queued {
    /// The call to send, with the provider's fds in it.
    pub call: Message,
    /// What it will wait for once sent.
    pub pending: Pending,
}

/// What the reply to a call needs of it, kept instead of the call: a
/// call's message holds all it carried (options of many KiB, fds) and
/// counts against libdbus's receive limit for as long as it is kept.
pub(super) struct ReplyTo {
    sender: String,
    serial: u32,
}

impl ReplyTo {
    /// Whom to answer for `call` (a call without a sender, which the bus
    /// never delivers, gets its answer nowhere).
    pub fn of(call: &Message) -> ReplyTo {
        ReplyTo {
            sender: call.sender().map(|s| s.to_string()).unwrap_or_default(),
            serial: call.get_serial().unwrap_or(0),
        }
    }

    /// A stand-in for the call: the same sender and serial, which are all
    /// its reply takes from it.
    fn stand_in(&self) -> Message {
        let mut call = Message::new_method_call(DBUS_NAME, "/", DBUS_NAME, "Call")
            .expect("a valid stand-in call");
        call.set_serial(self.serial);
        if let Ok(sender) = dbus::strings::BusName::new(self.sender.as_str()) {
            call.set_sender(Some(sender));
        }
        call
    }

    /// The method return to the call.
    pub fn method_return(&self) -> Message {
        self.stand_in().method_return()
    }

    /// The error reply `name` with `text` to the call.
    pub fn error(&self, name: &dbus::strings::ErrorName<'_>, text: &std::ffi::CStr) -> Message {
        self.stand_in().error(name, text)
    }
}

/// What became of an `AcceptSession` call.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// An empty method return: the session opens.
    Accepted,
    /// The provider refused: the error name and message for the client.
    Refused(&'static str, String),
    /// No usable answer: `ProviderUnavailable` with this message.
    Unavailable(String),
}

/// The `AcceptSession` call handing `h` to its provider, the session
/// named after `names`. The provider's fds move into the message: the
/// broker keeps only its end of the link and the client's half (in the
/// session's entry).
pub(super) fn accept_call(h: Handover, names: &Names) -> Result<Message, String> {
    let reg = &h.registration;
    let msg = Message::new_method_call(
        reg.provider.bus_name.as_str(),
        reg.object.as_str(),
        PROVIDER_INTERFACE,
        member::ACCEPT_SESSION,
    )?;
    let args: AcceptSessionArgs = AcceptSession {
        session: names.session_path(h.info.id).into(),
        service: h.info.service.clone(),
        caller: h.info.owner.clone(),
        options: h.options,
        fds: h.fds,
        link: h.link,
        parameters: h.parameters.to_dict(),
    }
    .into();
    let mut msg = msg;
    msg.append_all(args);
    Ok(msg)
}

/// Error names a provider's refusal keeps; any other becomes `Refused`.
const RELAYED: [&str; 5] = [
    error::INVALID_OPTION,
    error::INVALID_CAPACITY,
    error::LIMIT_EXCEEDED,
    error::ACCESS_DENIED,
    error::UNKNOWN_SERVICE,
];

/// Judges an answer to `AcceptSession` that came from `provider` or from
/// the bus daemon (callers drop answers from anyone else).
pub(super) fn judge(answer: &mut Message, provider: &str) -> Verdict {
    let from_provider = answer.sender().as_deref() == Some(provider);
    let kind = answer.msg_type();
    if kind == MessageType::MethodReturn && from_provider {
        return if answer.iter_init().arg_type() == dbus::arg::ArgType::Invalid {
            Verdict::Accepted
        } else {
            Verdict::Unavailable(format!(
                "provider {provider} answered AcceptSession with a body"
            ))
        };
    }
    if kind != MessageType::Error {
        return Verdict::Unavailable(format!("provider {provider} answered wrongly"));
    }
    let (name, reason) = match answer.as_result() {
        Err(e) => (
            e.name().unwrap_or("").to_owned(),
            cut(e.message().unwrap_or(""), LOGGED_ERROR).into_owned(),
        ),
        Ok(_) => (String::new(), String::new()),
    };
    match kind {
        MessageType::Error if from_provider => {
            let kept = RELAYED.iter().find(|n| **n == name);
            match kept {
                Some(kept) => Verdict::Refused(kept, reason),
                None => Verdict::Refused(
                    error::REFUSED,
                    cut(
                        &format!("{} ({reason})", cut(&name, LOGGED_STRING)),
                        LOGGED_ERROR,
                    )
                    .into_owned(),
                ),
            }
        }
        _ => Verdict::Unavailable(format!(
            "provider {provider} could not be reached: {reason}"
        )),
    }
}

/// Whether an answer to `AcceptSession` from `sender` may count: the
/// provider's own, or an error the bus made up for it.
pub(super) fn counts(answer: &Message, provider: &str) -> bool {
    let sender = answer.sender();
    let sender = sender.as_deref().unwrap_or("");
    sender == provider || (sender == DBUS_NAME && answer.msg_type() == MessageType::Error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> Message {
        let mut m = Message::new_method_call(":1.5", "/p", PROVIDER_INTERFACE, "AcceptSession")
            .expect("call");
        m.set_serial(7);
        m.set_sender(Some(":1.1".into()));
        m
    }

    fn from(mut m: Message, sender: &str) -> Message {
        m.set_sender(Some(sender.into()));
        m
    }

    fn error(name: &str, text: &str) -> Message {
        call().error(&name.into(), &std::ffi::CString::new(text).expect("text"))
    }

    #[test]
    fn answers_become_verdicts() {
        let mut ok = from(call().method_return(), ":1.5");
        assert_eq!(judge(&mut ok, ":1.5"), Verdict::Accepted);
        let mut body = from(call().method_return().append1(1u32), ":1.5");
        assert!(
            matches!(judge(&mut body, ":1.5"), Verdict::Unavailable(m) if m.contains("with a body")),
        );
        for name in RELAYED {
            let mut e = from(error(name, "no"), ":1.5");
            assert_eq!(judge(&mut e, ":1.5"), Verdict::Refused(name, "no".into()));
        }
        let mut e = from(error("com.example.Busy", "try later"), ":1.5");
        assert_eq!(
            judge(&mut e, ":1.5"),
            Verdict::Refused(error::REFUSED, "com.example.Busy (try later)".into())
        );
        let huge = "x".repeat(1 << 20);
        let mut e = from(error("com.example.Busy", &huge), ":1.5");
        match judge(&mut e, ":1.5") {
            Verdict::Refused(name, m) => {
                assert_eq!(name, error::REFUSED);
                assert!(m.len() <= LOGGED_ERROR + 64, "cut to the cap: {}", m.len());
            }
            other => panic!("{other:?}"),
        }
        let mut bus = from(
            error("org.freedesktop.DBus.Error.NoReply", "recipient left"),
            DBUS_NAME,
        );
        assert!(counts(&bus, ":1.5"));
        assert!(
            matches!(judge(&mut bus, ":1.5"), Verdict::Unavailable(m) if m.contains("recipient left"))
        );
    }

    #[test]
    fn a_reply_to_is_the_reply_to_the_call() {
        let to = ReplyTo::of(&call());
        let reply = to.method_return();
        assert_eq!(reply.get_reply_serial(), Some(7));
        assert_eq!(reply.destination().as_deref(), Some(":1.1"));
        let e = to.error(&error::REFUSED.into(), c"no");
        assert_eq!(e.get_reply_serial(), Some(7));
        assert_eq!(e.destination().as_deref(), Some(":1.1"));
        assert_eq!(e.msg_type(), MessageType::Error);
    }

    #[test]
    fn only_the_provider_or_the_bus_may_answer() {
        assert!(counts(&from(call().method_return(), ":1.5"), ":1.5"));
        assert!(!counts(&from(call().method_return(), ":1.6"), ":1.5"));
        assert!(!counts(&from(error(error::REFUSED, "x"), ":1.6"), ":1.5"));
        assert!(
            !counts(&from(call().method_return(), DBUS_NAME), ":1.5"),
            "the bus never accepts for a provider"
        );
    }
}
