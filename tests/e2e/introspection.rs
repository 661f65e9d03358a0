//! The live introspection of a running daemon matches interfaces/*.xml.

use shmlink_interfaces::{
    BROKER_INTERFACE, BROKER_PATH, BROKER_XML, BUS_NAME, PROVIDER_INTERFACE, PROVIDER_XML,
    SESSION_INTERFACE, SESSION_XML,
};
use shmlink_tests::Harness;
use std::collections::BTreeSet;

/// The comparable shape of one interface: members with their typed, named arguments.
fn shape(xml: &str, interface: &str) -> BTreeSet<String> {
    let doc = roxmltree::Document::parse_with_options(
        xml,
        roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        },
    )
    .expect("valid XML");
    let iface = doc
        .descendants()
        .find(|n| n.has_tag_name("interface") && n.attribute("name") == Some(interface))
        .unwrap_or_else(|| panic!("interface {interface} missing"));
    let mut out = BTreeSet::new();
    for m in iface.children().filter(|n| n.is_element()) {
        let kind = m.tag_name().name();
        let name = m.attribute("name").unwrap_or("");
        match kind {
            "method" | "signal" => {
                let args: Vec<String> = m
                    .children()
                    .filter(|a| a.has_tag_name("arg"))
                    .map(|a| {
                        let dir = if kind == "signal" {
                            "out"
                        } else {
                            a.attribute("direction").unwrap_or("in")
                        };
                        format!(
                            "{}:{}:{}",
                            a.attribute("name").unwrap_or(""),
                            a.attribute("type").unwrap_or(""),
                            dir
                        )
                    })
                    .collect();
                out.insert(format!("{kind} {name}({})", args.join(", ")));
            }
            "property" => {
                // Whether (and how) a change is announced is part of the contract.
                let emits = m
                    .children()
                    .find(|a| {
                        a.has_tag_name("annotation")
                            && a.attribute("name")
                                == Some("org.freedesktop.DBus.Property.EmitsChangedSignal")
                    })
                    .and_then(|a| a.attribute("value"))
                    .unwrap_or("true");
                out.insert(format!(
                    "property {name}: {} {} emits {emits}",
                    m.attribute("type").unwrap_or(""),
                    m.attribute("access").unwrap_or("")
                ));
            }
            _ => {}
        }
    }
    out
}

fn introspect(h: &Harness, path: &str) -> String {
    let conn = dbus::blocking::Connection::new_address(h.address()).expect("connect");
    let proxy = conn.with_proxy(BUS_NAME, path, std::time::Duration::from_secs(5));
    let (xml,): (String,) = proxy
        .method_call("org.freedesktop.DBus.Introspectable", "Introspect", ())
        .expect("Introspect");
    xml
}

#[test]
fn live_introspection_matches_the_documented_xml() {
    let h = Harness::start();
    let live = introspect(&h, BROKER_PATH);
    let documented = shape(BROKER_XML, BROKER_INTERFACE);
    assert_eq!(
        shape(&live, BROKER_INTERFACE),
        documented,
        "Broker1 drifted"
    );
    // The provider methods are part of it, and Services announces its changes.
    for expected in [
        "method RegisterService(service:s:in, object:o:in, options:a{sv}:in)",
        "method UnregisterService(service:s:in)",
        "method ListServices(services:a(ssu):out)",
        "property Services: as read emits true",
    ] {
        assert!(documented.contains(expected), "{expected} missing");
    }
    let s = h
        .client()
        .session("echo")
        .capacity(4096)
        .open()
        .expect("open");
    let live = introspect(&h, s.path());
    assert_eq!(
        shape(&live, SESSION_INTERFACE),
        shape(SESSION_XML, SESSION_INTERFACE),
        "Session1 drifted"
    );
    // The broker's node lists the session as a child, so `busctl tree` finds it.
    let root = introspect(&h, "/org/shmlink/Broker1/session");
    assert!(
        root.contains(&format!(
            "name=\"{}\"",
            s.path().rsplit('/').next().unwrap()
        )),
        "{root}"
    );
}

#[test]
fn the_documented_xml_documents_every_member() {
    for (xml, iface) in [
        (BROKER_XML, BROKER_INTERFACE),
        (SESSION_XML, SESSION_INTERFACE),
        (PROVIDER_XML, PROVIDER_INTERFACE),
    ] {
        let doc = roxmltree::Document::parse_with_options(
            xml,
            roxmltree::ParsingOptions {
                allow_dtd: true,
                ..Default::default()
            },
        )
        .expect("valid XML");
        for m in doc.descendants().filter(|n| {
            ["method", "signal", "property", "interface"].contains(&n.tag_name().name())
        }) {
            let documented = m.children().any(|c| {
                c.has_tag_name("annotation")
                    && c.attribute("name") == Some("org.freedesktop.DBus.DocString")
            });
            assert!(
                documented,
                "{iface}: {} {:?} lacks a DocString annotation",
                m.tag_name().name(),
                m.attribute("name")
            );
        }
    }
}
