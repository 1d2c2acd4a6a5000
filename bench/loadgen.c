/*
 * loadgen: L2TP traffic for bench/fastpath_bench.py (compiled by it into bench/build/).
 *
 *   loadgen send   --src A --dst B [--sport 1701] [--dport 1701] [--size 50] [--tunnels 1]
 *                  [--first-tid 1] [--session 1] [--rate 0] [--duration 2] [--batch 64] [--probe]
 *       L2TP data packets (0x4002, length, tunnel ID, session ID, PPP ff03 0021, filler) from A to B
 *       with sendmmsg, tunnel IDs cycled first-tid .. first-tid+tunnels-1. --rate 0 = as fast as
 *       possible. --probe: one packet per call, CLOCK_MONOTONIC send time and a sequence number in
 *       the payload (for one-way latency at a low rate). Send errors (a full NFQUEUE, ENOBUFS) are
 *       counted by errno and the packet is skipped.
 *   loadgen recv   --bind A [--port 1701] [--timeout 60] [--idle 0] [--probe]
 *       recvmmsg counting receiver; stops on SIGTERM/SIGINT, after --timeout s, or after --idle s
 *       without a packet once one came. With --probe: one-way latency percentiles.
 *   loadgen sccrq  --src A[,A2...] --dst B [--first-tid 1] [--count N] [--rate 0] [--times F]
 *                  [--linger 0.5]
 *       Client SCCRQs (header tunnel ID 0, Assigned Tunnel ID AVP = the tunnel ID), from each source
 *       address's udp/1701, tunnel IDs first-tid .. first-tid+count-1 per address, --rate per second
 *       in all (0 = back to back). SCCRPs that come back are timestamped as they arrive (while
 *       sending too), until each SCCRQ has its SCCRP or none came for --linger s. Writes
 *       "addr tid sccrq_send_ns sccrp_arrival_ns" lines (0 = no SCCRP) to F.
 *   loadgen lns    --bind B [--port 1701] [--times F] [--timeout 600]
 *       Fake LNS: answers every SCCRQ with an SCCRP (header tunnel ID = the client's ID, Assigned
 *       Tunnel ID AVP = 65536 - the client's ID); writes "addr client_tid gw_tid send_ns" lines to
 *       F on SIGTERM (send_ns is taken just before sendto).
 *   loadgen dump   --kind data|sccrq|sccrp [--size 50] [--tid 7]
 *       Prints one packet's UDP payload in hex (the bench checks it with the project's decoder).
 *
 * Every mode prints one JSON object on stdout when done; recv, lns print "READY" first (stdout,
 * flushed) once their socket is bound. All times are CLOCK_MONOTONIC nanoseconds.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAXPKT 2048
#define MAXBATCH 1024
#define MAXSRC 16

static volatile sig_atomic_t stop_flag;
static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t t) {
    struct timespec ts = {(time_t)(t / 1000000000ull), (long)(t % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR && !stop_flag) {}
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* ------------------------------------------------------------------ options */
struct opts {
    const char *src, *dst, *bind, *times, *kind;
    int sport, dport, port, size, tunnels, first_tid, session, batch, probe, count, tid;
    double rate, duration, timeout, idle, linger;
};

static void usage(void) {
    fprintf(stderr, "usage: loadgen send|recv|sccrq|lns|dump [options] (see the comment at the top of loadgen.c)\n");
    exit(2);
}

static void parse(int argc, char **argv, struct opts *o) {
    memset(o, 0, sizeof *o);
    o->sport = o->dport = o->port = 1701;
    o->size = 50; o->tunnels = 1; o->first_tid = 1; o->session = 1; o->batch = 64;
    o->count = 1000; o->tid = 7; o->kind = "data";
    o->duration = 2.0; o->timeout = 60.0; o->linger = 0.5;
    for (int i = 2; i < argc; i++) {
        const char *k = argv[i];
        if (!strcmp(k, "--probe")) { o->probe = 1; continue; }
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(k, "--src")) o->src = v;
        else if (!strcmp(k, "--dst")) o->dst = v;
        else if (!strcmp(k, "--bind")) o->bind = v;
        else if (!strcmp(k, "--times")) o->times = v;
        else if (!strcmp(k, "--kind")) o->kind = v;
        else if (!strcmp(k, "--sport")) o->sport = atoi(v);
        else if (!strcmp(k, "--dport")) o->dport = atoi(v);
        else if (!strcmp(k, "--port")) o->port = atoi(v);
        else if (!strcmp(k, "--size")) o->size = atoi(v);
        else if (!strcmp(k, "--tunnels")) o->tunnels = atoi(v);
        else if (!strcmp(k, "--first-tid")) o->first_tid = atoi(v);
        else if (!strcmp(k, "--session")) o->session = atoi(v);
        else if (!strcmp(k, "--batch")) o->batch = atoi(v);
        else if (!strcmp(k, "--count")) o->count = atoi(v);
        else if (!strcmp(k, "--tid")) o->tid = atoi(v);
        else if (!strcmp(k, "--rate")) o->rate = atof(v);
        else if (!strcmp(k, "--duration")) o->duration = atof(v);
        else if (!strcmp(k, "--timeout")) o->timeout = atof(v);
        else if (!strcmp(k, "--idle")) o->idle = atof(v);
        else if (!strcmp(k, "--linger")) o->linger = atof(v);
        else usage();
    }
    if (o->batch < 1) o->batch = 1;
    if (o->batch > MAXBATCH) o->batch = MAXBATCH;
    if (o->tunnels < 1) o->tunnels = 1;
}

static struct sockaddr_in addr_of(const char *a, int port) {
    struct sockaddr_in s;
    memset(&s, 0, sizeof s);
    s.sin_family = AF_INET;
    s.sin_port = htons((uint16_t)port);
    if (!a || inet_pton(AF_INET, a, &s.sin_addr) != 1) {
        fprintf(stderr, "loadgen: bad IPv4 address %s\n", a ? a : "(none)");
        exit(2);
    }
    return s;
}

static int udp_socket(const char *a, int port) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    int one = 1, big = 16 << 20;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    struct sockaddr_in s = addr_of(a, port);
    if (bind(fd, (struct sockaddr *)&s, sizeof s) < 0) die("bind");
    return fd;
}

static void set_rcvtimeo(int fd, long usec) {
    struct timeval tv = {usec / 1000000, usec % 1000000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

static void put16(uint8_t *p, unsigned v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static unsigned get16(const uint8_t *p) { return (unsigned)p[0] << 8 | p[1]; }

/* ------------------------------------------------------------------ packets */
/* L2TP data: 0x4002 (L, version 2), length, tunnel ID, session ID, PPP ff03 0021, filler. */
static int build_data(uint8_t *b, int size, unsigned tid, unsigned sid) {
    if (size < 24) size = 24;
    if (size > MAXPKT) size = MAXPKT;
    memset(b, 0, (size_t)size);
    b[0] = 0x40; b[1] = 0x02;
    put16(b + 2, (unsigned)size);
    put16(b + 4, tid);
    put16(b + 6, sid);
    b[8] = 0xff; b[9] = 0x03; b[10] = 0x00; b[11] = 0x21;
    for (int i = 24; i < size; i++) b[i] = (uint8_t)i;
    return size;
}

static int avp(uint8_t *p, unsigned type, const uint8_t *val, unsigned len) {
    put16(p, 0x8000 | (6 + len)); /* M bit, length */
    put16(p + 2, 0);              /* vendor 0 */
    put16(p + 4, type);
    memcpy(p + 6, val, len);
    return (int)(6 + len);
}

/* Control message: c802 (T, L, S, version 2), length, tunnel ID, session 0, Ns, Nr, AVPs. */
static int build_ctl(uint8_t *b, unsigned msg_type, unsigned hdr_tid, unsigned assigned_tid,
                     unsigned nr, const char *host) {
    uint8_t v[8];
    int n = 12;
    b[0] = 0xc8; b[1] = 0x02;
    put16(b + 4, hdr_tid);
    put16(b + 6, 0);
    put16(b + 8, 0);   /* Ns */
    put16(b + 10, nr); /* Nr */
    put16(v, msg_type); n += avp(b + n, 0, v, 2);           /* Message Type (first) */
    v[0] = 1; v[1] = 0; n += avp(b + n, 2, v, 2);            /* Protocol Version 1.0 */
    memset(v, 0, 4); v[3] = 3; n += avp(b + n, 3, v, 4);     /* Framing Capabilities */
    n += avp(b + n, 7, (const uint8_t *)host, (unsigned)strlen(host)); /* Host Name */
    put16(v, assigned_tid); n += avp(b + n, 9, v, 2);        /* Assigned Tunnel ID */
    put16(b + 2, (unsigned)n);
    return n;
}

/* Assigned Tunnel ID of an SCCRQ (header tunnel ID 0), or -1. */
static int sccrq_tid(const uint8_t *b, int len) {
    if (len < 12 || (b[0] & 0xc8) != 0xc8 || (b[1] & 0x0f) != 2) return -1;
    if (get16(b + 4) != 0) return -1;
    int off = 12, msg = -1, tid = -1;
    if (b[0] & 0x02) { if (len < 14) return -1; off = 14 + get16(b + 12); } /* O bit */
    while (off + 6 <= len) {
        unsigned alen = get16(b + off) & 0x3ff;
        if (alen < 6 || off + (int)alen > len) return -1;
        unsigned vendor = get16(b + off + 2), type = get16(b + off + 4);
        if (vendor == 0 && type == 0 && alen >= 8) msg = (int)get16(b + off + 6);
        if (vendor == 0 && type == 9 && alen >= 8 && !(b[off] & 0x40)) tid = (int)get16(b + off + 6);
        off += (int)alen;
    }
    return msg == 1 ? tid : -1;
}

/* ------------------------------------------------------------------ send */
struct errcount { int err; uint64_t n; };
static struct errcount errs[16];
static void count_err(int e) {
    for (int i = 0; i < 16; i++) {
        if (errs[i].n == 0 || errs[i].err == e) { errs[i].err = e; errs[i].n++; return; }
    }
}
static void print_errs(void) {
    printf("\"errno\": {");
    for (int i = 0, first = 1; i < 16 && errs[i].n; i++, first = 0)
        printf("%s\"%s\": %llu", first ? "" : ", ", strerrorname_np(errs[i].err) ? strerrorname_np(errs[i].err) : "?",
               (unsigned long long)errs[i].n);
    printf("}");
}

static int cmd_send(struct opts *o) {
    int fd = udp_socket(o->src, o->sport);
    struct sockaddr_in dst = addr_of(o->dst, o->dport);
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) die("connect");
    int batch = o->probe ? 1 : o->batch;
    static uint8_t bufs[MAXBATCH][MAXPKT];
    struct mmsghdr msgs[MAXBATCH];
    struct iovec iov[MAXBATCH];
    memset(msgs, 0, sizeof msgs);
    int size = o->size;
    for (int i = 0; i < batch; i++) {
        size = build_data(bufs[i], o->size, (unsigned)o->first_tid, (unsigned)o->session);
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = (size_t)size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    uint64_t sent = 0, errors = 0, attempted = 0, seq = 0;
    unsigned next_tid = 0;
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(o->duration * 1e9);
    double interval = o->rate > 0 ? 1e9 / o->rate : 0;
    while (!stop_flag) {
        uint64_t now = now_ns();
        if (now >= end) break;
        int n = batch;
        if (interval > 0) {
            uint64_t due = t0 + (uint64_t)((double)attempted * interval);
            if (due > now) { sleep_until(due < end ? due : end); continue; }
            uint64_t allowed = (uint64_t)((double)(now - t0) / interval) + 1 - attempted;
            if (allowed < (uint64_t)n) n = (int)allowed;
        }
        for (int i = 0; i < n; i++) {
            put16(bufs[i] + 4, (unsigned)o->first_tid + next_tid);
            next_tid = (next_tid + 1) % (unsigned)o->tunnels;
        }
        if (o->probe) {
            uint64_t ts = now_ns();
            memcpy(bufs[0] + 12, &ts, 8);
            memcpy(bufs[0] + 20, &seq, 4);
            seq++;
        }
        int r = sendmmsg(fd, msgs, (unsigned)n, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            count_err(errno);
            errors++;
            attempted++;
            /* the failed packet is skipped; its tunnel ID slot moves on */
            continue;
        }
        /* r < n: message r failed; the next call starts with it again (new tunnel IDs) and
         * counts the error then */
        sent += (uint64_t)r;
        attempted += (uint64_t)r;
    }
    double el = (double)(now_ns() - t0) / 1e9;
    printf("{\"mode\": \"send\", \"sent\": %llu, \"errors\": %llu, \"elapsed\": %.6f, \"size\": %d, "
           "\"tunnels\": %d, \"pps\": %.1f, ", (unsigned long long)sent, (unsigned long long)errors, el,
           size, o->tunnels, el > 0 ? (double)sent / el : 0.0);
    print_errs();
    printf("}\n");
    return 0;
}

/* ------------------------------------------------------------------ recv */
static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(const uint64_t *v, size_t n, double p) {
    if (!n) return -1;
    size_t i = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
    if (i >= n) i = n - 1;
    return (double)v[i] / 1000.0; /* microseconds */
}

static int cmd_recv(struct opts *o) {
    int fd = udp_socket(o->bind, o->port);
    set_rcvtimeo(fd, 50000);
    static uint8_t bufs[256][MAXPKT];
    struct mmsghdr msgs[256];
    struct iovec iov[256];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < 256; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = MAXPKT;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    size_t cap = 2000000, nlat = 0;
    uint64_t *lat = o->probe ? malloc(cap * sizeof *lat) : NULL;
    uint64_t count = 0, bytes = 0, first = 0, last = 0, bad = 0;
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(o->timeout * 1e9);
    printf("READY\n");
    fflush(stdout);
    while (!stop_flag) {
        int r = recvmmsg(fd, msgs, 256, MSG_WAITFORONE, NULL);
        uint64_t now = now_ns();
        if (r > 0) {
            if (!count) first = now;
            last = now;
            for (int i = 0; i < r; i++) {
                unsigned len = msgs[i].msg_len;
                count++;
                bytes += len;
                if (len < 8 || bufs[i][0] != 0x40 || bufs[i][1] != 0x02) { bad++; continue; }
                if (lat && len >= 24 && nlat < cap) {
                    uint64_t ts;
                    memcpy(&ts, bufs[i] + 12, 8);
                    if (ts <= now) lat[nlat++] = now - ts;
                }
            }
        } else if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            die("recvmmsg");
        }
        if (now >= end) break;
        if (o->idle > 0 && count && now - last > (uint64_t)(o->idle * 1e9)) break;
    }
    double span = count > 1 ? (double)(last - first) / 1e9 : 0;
    printf("{\"mode\": \"recv\", \"received\": %llu, \"bytes\": %llu, \"bad\": %llu, \"first_ns\": %llu, "
           "\"last_ns\": %llu, \"span\": %.6f, \"pps\": %.1f",
           (unsigned long long)count, (unsigned long long)bytes, (unsigned long long)bad,
           (unsigned long long)first, (unsigned long long)last, span,
           span > 0 ? (double)(count - 1) / span : 0.0);
    if (lat) {
        qsort(lat, nlat, sizeof *lat, cmp_u64);
        printf(", \"lat_n\": %zu, \"lat_p50_us\": %.3f, \"lat_p90_us\": %.3f, \"lat_p99_us\": %.3f, "
               "\"lat_max_us\": %.3f", nlat, pct(lat, nlat, 50), pct(lat, nlat, 90), pct(lat, nlat, 99),
               nlat ? (double)lat[nlat - 1] / 1000.0 : -1.0);
    }
    printf("}\n");
    return 0;
}

/* ------------------------------------------------------------------ sccrq */
/* Header tunnel ID of an SCCRP (the client's ID), or -1. */
static int sccrp_tid(const uint8_t *b, int len) {
    if (len < 20 || (b[0] & 0xc8) != 0xc8 || (b[1] & 0x0f) != 2 || (b[0] & 0x02)) return -1;
    if (get16(b + 12) >> 15 == 0 || get16(b + 14) != 0 || get16(b + 16) != 0 || get16(b + 18) != 2) return -1;
    return (int)get16(b + 4);
}

struct sccrq_state {
    int nsrc, fds[MAXSRC];
    unsigned first;
    uint64_t count, replies, dup, last_reply;
    uint64_t *reply; /* [src * count + (tid - first)] */
};

static void drain_replies(struct sccrq_state *st) {
    uint8_t b[512];
    for (int i = 0; i < st->nsrc; i++) {
        for (;;) {
            ssize_t r = recv(st->fds[i], b, sizeof b, MSG_DONTWAIT);
            if (r <= 0) break;
            uint64_t now = now_ns();
            int tid = sccrp_tid(b, (int)r);
            if (tid < (int)st->first || (uint64_t)tid >= st->first + st->count) continue;
            uint64_t *slot = &st->reply[(uint64_t)i * st->count + ((unsigned)tid - st->first)];
            if (*slot) { st->dup++; continue; }
            *slot = now;
            st->replies++;
            st->last_reply = now;
        }
    }
}

/* Wait for replies until time t (absolute), draining them as they come. */
static void wait_replies(struct sccrq_state *st, uint64_t t) {
    struct pollfd pfd[MAXSRC];
    for (int i = 0; i < st->nsrc; i++) { pfd[i].fd = st->fds[i]; pfd[i].events = POLLIN; }
    for (;;) {
        drain_replies(st);
        uint64_t now = now_ns();
        if (now >= t || stop_flag) return;
        struct timespec ts = {(time_t)((t - now) / 1000000000ull), (long)((t - now) % 1000000000ull)};
        ppoll(pfd, (nfds_t)st->nsrc, &ts, NULL);
    }
}

static int cmd_sccrq(struct opts *o) {
    char srcs_buf[512];
    char *srcs[MAXSRC];
    struct sccrq_state st;
    memset(&st, 0, sizeof st);
    snprintf(srcs_buf, sizeof srcs_buf, "%s", o->src ? o->src : "");
    for (char *save = NULL, *t = strtok_r(srcs_buf, ",", &save); t && st.nsrc < MAXSRC; t = strtok_r(NULL, ",", &save))
        srcs[st.nsrc++] = t;
    if (!st.nsrc || o->count < 1 || o->first_tid < 1 || o->first_tid + o->count - 1 > 65535) usage();
    struct sockaddr_in dst = addr_of(o->dst, o->dport);
    for (int i = 0; i < st.nsrc; i++) {
        st.fds[i] = udp_socket(srcs[i], o->sport);
        if (connect(st.fds[i], (struct sockaddr *)&dst, sizeof dst) < 0) die("connect");
    }
    st.first = (unsigned)o->first_tid;
    st.count = (uint64_t)o->count;
    uint64_t total = st.count * (uint64_t)st.nsrc;
    uint64_t *times = calloc(total, sizeof *times);
    st.reply = calloc(total, sizeof *st.reply);
    if (!times || !st.reply) die("calloc");
    uint8_t b[256];
    uint64_t sent = 0, errors = 0;
    double interval = o->rate > 0 ? 1e9 / o->rate : 0;
    uint64_t t0 = now_ns();
    /* k runs over tunnel IDs, then sources: every address gets tunnel first, then first+1, ... */
    for (uint64_t k = 0; k < total && !stop_flag; k++) {
        int s = (int)(k % (uint64_t)st.nsrc);
        uint64_t idx = k / (uint64_t)st.nsrc;
        if (interval > 0) {
            uint64_t due = t0 + (uint64_t)((double)k * interval);
            if (due > now_ns()) wait_replies(&st, due);
        } else if ((k & 31) == 0) {
            drain_replies(&st);
        }
        int n = build_ctl(b, 1, 0, (st.first + (unsigned)idx) & 0xffff, 0, "bench-client");
        uint64_t ts = now_ns();
        if (send(st.fds[s], b, (size_t)n, 0) < 0) { count_err(errno); errors++; continue; }
        times[(uint64_t)s * st.count + idx] = ts;
        sent++;
    }
    uint64_t t1 = now_ns();
    /* linger: until every SCCRQ has its SCCRP, or none came for --linger seconds */
    uint64_t hard_end = t1 + 120ull * 1000000000ull;
    while (!stop_flag && st.replies < sent) {
        uint64_t since = st.last_reply > t1 ? st.last_reply : t1;
        uint64_t idle_end = since + (uint64_t)(o->linger * 1e9);
        uint64_t now = now_ns();
        if (now >= idle_end || now >= hard_end) break;
        wait_replies(&st, idle_end < hard_end ? idle_end : hard_end);
    }
    if (o->times) {
        FILE *f = fopen(o->times, "w");
        if (!f) die("open times file");
        for (int s = 0; s < st.nsrc; s++)
            for (uint64_t i = 0; i < st.count; i++) {
                uint64_t k = (uint64_t)s * st.count + i;
                if (times[k]) fprintf(f, "%s %u %llu %llu\n", srcs[s], st.first + (unsigned)i,
                                      (unsigned long long)times[k], (unsigned long long)st.reply[k]);
            }
        fclose(f);
    }
    printf("{\"mode\": \"sccrq\", \"sent\": %llu, \"errors\": %llu, \"elapsed\": %.6f, \"sccrp_received\": %llu, "
           "\"sccrp_duplicates\": %llu, \"first_ns\": %llu, \"last_sent_ns\": %llu, \"last_reply_ns\": %llu, ",
           (unsigned long long)sent, (unsigned long long)errors, (double)(t1 - t0) / 1e9,
           (unsigned long long)st.replies, (unsigned long long)st.dup, (unsigned long long)t0,
           (unsigned long long)t1, (unsigned long long)st.last_reply);
    print_errs();
    printf("}\n");
    return 0;
}

/* ------------------------------------------------------------------ lns */
struct answer { uint32_t addr; uint16_t ctid, gtid; uint64_t ns; };

static int cmd_lns(struct opts *o) {
    int fd = udp_socket(o->bind, o->port);
    set_rcvtimeo(fd, 50000);
    static uint8_t bufs[64][MAXPKT];
    struct mmsghdr msgs[64];
    struct iovec iov[64];
    struct sockaddr_in from[64];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < 64; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = MAXPKT;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &from[i];
    }
    size_t cap = 1 << 20, n = 0;
    struct answer *ans = malloc(cap * sizeof *ans);
    uint64_t received = 0, ignored = 0, errors = 0;
    uint64_t end = now_ns() + (uint64_t)(o->timeout * 1e9);
    uint8_t out[256];
    printf("READY\n");
    fflush(stdout);
    while (!stop_flag && now_ns() < end) {
        for (int i = 0; i < 64; i++) msgs[i].msg_hdr.msg_namelen = sizeof from[i];
        int r = recvmmsg(fd, msgs, 64, MSG_WAITFORONE, NULL);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
            die("recvmmsg");
        }
        for (int i = 0; i < r; i++) {
            received++;
            int ctid = sccrq_tid(bufs[i], (int)msgs[i].msg_len);
            if (ctid <= 0) { ignored++; continue; }
            unsigned gtid = 65536u - (unsigned)ctid;
            int len = build_ctl(out, 2, (unsigned)ctid, gtid, 1, "bench-lns");
            uint64_t ts = now_ns();
            if (sendto(fd, out, (size_t)len, 0, (struct sockaddr *)&from[i], sizeof from[i]) < 0) {
                count_err(errno);
                errors++;
                continue;
            }
            if (n < cap) ans[n++] = (struct answer){from[i].sin_addr.s_addr, (uint16_t)ctid, (uint16_t)gtid, ts};
        }
    }
    if (o->times) {
        FILE *f = fopen(o->times, "w");
        if (!f) die("open times file");
        char a[INET_ADDRSTRLEN];
        for (size_t i = 0; i < n; i++) {
            struct in_addr ia = {ans[i].addr};
            inet_ntop(AF_INET, &ia, a, sizeof a);
            fprintf(f, "%s %u %u %llu\n", a, ans[i].ctid, ans[i].gtid, (unsigned long long)ans[i].ns);
        }
        fclose(f);
    }
    printf("{\"mode\": \"lns\", \"received\": %llu, \"answered\": %zu, \"ignored\": %llu, \"errors\": %llu, ",
           (unsigned long long)received, n, (unsigned long long)ignored, (unsigned long long)errors);
    print_errs();
    printf("}\n");
    return 0;
}

/* ------------------------------------------------------------------ dump */
static int cmd_dump(struct opts *o) {
    uint8_t b[MAXPKT];
    int n;
    if (!strcmp(o->kind, "sccrq")) n = build_ctl(b, 1, 0, (unsigned)o->tid, 0, "bench-client");
    else if (!strcmp(o->kind, "sccrp")) n = build_ctl(b, 2, (unsigned)o->tid, 65536u - (unsigned)o->tid, 1, "bench-lns");
    else n = build_data(b, o->size, (unsigned)o->tid, (unsigned)o->session);
    for (int i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\n");
    if (!strcmp(o->kind, "sccrq") && sccrq_tid(b, n) != o->tid) {
        fprintf(stderr, "loadgen: own SCCRQ parser disagrees\n");
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: blocking calls return EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    struct opts o;
    parse(argc, argv, &o);
    const char *m = argv[1];
    if (!strcmp(m, "send")) return cmd_send(&o);
    if (!strcmp(m, "recv")) return cmd_recv(&o);
    if (!strcmp(m, "sccrq")) return cmd_sccrq(&o);
    if (!strcmp(m, "lns")) return cmd_lns(&o);
    if (!strcmp(m, "dump")) return cmd_dump(&o);
    usage();
    return 2;
}
