/*
 * echo_poll: talk to shmlink's `echo` service from C with a poll() loop.
 *
 *   cc echo_poll.c -o echo_poll $(pkg-config --cflags --libs shmlink)
 *   ./echo_poll [BUS] [COUNT]     BUS: session (default), system or a D-Bus address
 *
 * Sends COUNT messages of growing size, waits for each echo on the session's
 * pollable fd with non-blocking receives into a buffer that starts small and
 * grows when a message does not fit, then ends the stream and closes.
 */
#include <poll.h>
#include <shmlink.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, shmlink_error *err) {
    fprintf(stderr, "echo_poll: %s: %s (%s)\n", what, shmlink_error_message(err),
            shmlink_status_name(shmlink_error_code(err)));
    shmlink_error_free(err);
    return 1;
}

/* Waits on the session's fd, then receives without blocking: one message
 * into *buf (growing it as needed), or the end of stream. Returns the
 * receive's status. */
static int next(shmlink_session *s, unsigned char **buf, size_t *cap, size_t *len,
                int *grown, shmlink_error **err) {
    struct pollfd p = {.fd = shmlink_session_fd(s), .events = POLLIN};
    for (;;) {
        int rc = shmlink_session_try_recv(s, *buf, *cap, len, err);
        if (rc == SHMLINK_ERR_BUFFER_TOO_SMALL) {
            /* The message is kept: make room for *len bytes and ask again. */
            shmlink_error_free(*err);
            *err = NULL;
            unsigned char *bigger = realloc(*buf, *len);
            if (bigger == NULL) {
                fprintf(stderr, "echo_poll: out of memory\n");
                exit(1);
            }
            *buf = bigger;
            *cap = *len;
            ++*grown;
            continue;
        }
        if (rc != SHMLINK_AGAIN)
            return rc;
        /* Nothing yet: sleep until the fd says a message or the end came. */
        if (poll(&p, 1, 10000) <= 0) {
            fprintf(stderr, "echo_poll: no reply within 10 s\n");
            exit(1);
        }
    }
}

int main(int argc, char **argv) {
    const char *bus = argc > 1 ? argv[1] : "session";
    int count = argc > 2 ? atoi(argv[2]) : 100;
    shmlink_error *err = NULL;

    shmlink_client *client = shmlink_client_connect(bus, &err);
    if (client == NULL)
        return fail("connect", err);

    /* A refused open reports the broker's D-Bus error name. */
    shmlink_session *none = shmlink_session_open(client, "no-such-service", NULL, &err);
    if (none != NULL || shmlink_error_code(err) != SHMLINK_ERR_REFUSED) {
        fprintf(stderr, "echo_poll: opening an unknown service did not fail as refused\n");
        return 1;
    }
    printf("refused: %s\n", shmlink_error_dbus_name(err));
    shmlink_error_free(err);
    err = NULL;

    shmlink_options *opts = shmlink_options_new();
    shmlink_options_set_capacity(opts, 1 << 20);
    shmlink_options_set_wakeup_park(opts);
    shmlink_options_set_timeout(opts, 10000); /* blocking calls give up after 10 s */
    shmlink_session *s = shmlink_session_open(client, "echo", opts, &err);
    shmlink_options_free(opts);
    if (s == NULL)
        return fail("open echo", err);
    printf("session %s, max message %u bytes\n", shmlink_session_path(s),
           shmlink_session_max_message(s));

    size_t cap = 16, len = 0, total = 0;
    unsigned char *buf = malloc(cap), *msg = malloc(97 * (size_t)count + 1);
    int grown = 0;
    for (int i = 0; i < count; i++) {
        size_t n = 97 * (size_t)i;
        for (size_t j = 0; j < n; j++)
            msg[j] = (unsigned char)(i + j);
        if (shmlink_session_send(s, msg, n, &err) != SHMLINK_OK)
            return fail("send", err);
        int rc = next(s, &buf, &cap, &len, &grown, &err);
        if (rc != SHMLINK_OK)
            return rc < 0 ? fail("receive", err) : (fprintf(stderr, "echo_poll: early end\n"), 1);
        if (len != n || memcmp(buf, msg, n) != 0) {
            fprintf(stderr, "echo_poll: message %d came back changed\n", i);
            return 1;
        }
        total += len;
    }

    /* End our stream; echo answers with the end of its own. */
    if (shmlink_session_finish(s, &err) != SHMLINK_OK)
        return fail("finish", err);
    int rc = next(s, &buf, &cap, &len, &grown, &err);
    if (rc != SHMLINK_END)
        return rc < 0 ? fail("receive the end", err) : (fprintf(stderr, "echo_poll: no end\n"), 1);

    printf("echoed %d messages, %zu bytes, buffer grown %d times\n", count, total, grown);
    if (shmlink_session_close(s, &err) != SHMLINK_OK)
        return fail("close", err);
    free(buf);
    free(msg);
    shmlink_client_free(client);
    return 0;
}
