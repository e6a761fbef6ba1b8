/* linkemu: a long fat network between two network namespaces, emulated in user space.
 *
 * netem is not available here, so this program plays the path: it creates one TUN device
 * in each of two namespaces (setns into each before TUNSETIFF; the fds keep working from
 * wherever this process is) and moves every packet read from one device to the other
 * through a model of a bottleneck link:
 *
 *   - Bernoulli loss: each packet is dropped with probability --loss (seeded xorshift64*);
 *   - a FIFO bottleneck queue drained at --rate-mbit (serialisation: a packet departs at
 *     max(now, previous departure) + size / rate); a packet that would find more than
 *     --queue-bytes waiting is dropped (drop-tail);
 *   - a propagation delay of --delay-ms after departure (one way; the RTT is twice it).
 *
 * Both directions are modelled the same way and independently.  Packets are released by
 * an absolute timerfd armed at the earliest due time; epoll watches the two TUN fds, the
 * timer and a signalfd (SIGTERM/SIGINT end it).  Counters go to --stats as one JSON
 * object, rewritten (atomically, by rename) every 200 ms and at exit.  Once both devices
 * exist "ready" is printed on stdout; the caller then addresses them and sets them up.
 *
 *   linkemu --ns-a /run/netns/A --dev-a tunA --ns-b /run/netns/B --dev-b tunB
 *           [--rate-mbit 1000] [--delay-ms 25] [--loss 0.0001] [--queue-bytes N]
 *           [--seed 1] [--mtu 1500] [--stats FILE]
 *
 * Build: gcc -O2 -Wall -o linkemu linkemu.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define SLOTS (1u << 17) /* packets a direction may hold (queued + on the wire) */

struct pkt {
    uint64_t due; /* ns, CLOCK_MONOTONIC: when it leaves the far end of the wire */
    uint32_t len;
    uint8_t *data;
};

struct dir {
    const char *name;
    int in_fd, out_fd;
    struct pkt *ring;
    uint32_t head, tail; /* ring[head..tail) in order of due time */
    uint64_t last_departure;
    /* counters */
    uint64_t pkts_in, bytes_in, pkts_out, bytes_out;
    uint64_t drop_loss, drop_queue, drop_slots, write_errors, max_backlog;
};

static double rate_bps = 1e9, loss = 0.0;
static uint64_t delay_ns = 25000000ull, queue_bytes = 0, rng = 1;
static size_t mtu = 1500;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double uniform(void) { /* xorshift64*: reproducible for a given --seed */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (double)((rng * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

static void die(const char *what) {
    fprintf(stderr, "linkemu: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int open_tun(const char *ns_path, const char *dev) {
    int nsfd = open(ns_path, O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) die(ns_path);
    if (setns(nsfd, CLONE_NEWNET) < 0) die("setns");
    close(nsfd);
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", dev);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
    return fd;
}

/* Read everything the kernel has for us on d->in_fd and queue it. */
static void take(struct dir *d) {
    static uint8_t buf[65536];
    for (int i = 0; i < 1024; i++) {
        ssize_t n = read(d->in_fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            die("read");
        }
        uint64_t now = now_ns();
        d->pkts_in++;
        d->bytes_in += (uint64_t)n;
        if (loss > 0 && uniform() < loss) {
            d->drop_loss++;
            continue;
        }
        /* Bytes still waiting for the bottleneck when this packet arrives. */
        uint64_t backlog = d->last_departure > now
                               ? (uint64_t)((double)(d->last_departure - now) * rate_bps / 8e9)
                               : 0;
        if (backlog > d->max_backlog) d->max_backlog = backlog;
        if (backlog + (uint64_t)n > queue_bytes) {
            d->drop_queue++;
            continue;
        }
        if (d->tail - d->head >= SLOTS) {
            d->drop_slots++;
            continue;
        }
        uint64_t start = d->last_departure > now ? d->last_departure : now;
        d->last_departure = start + (uint64_t)((double)n * 8e9 / rate_bps);
        struct pkt *p = &d->ring[d->tail % SLOTS];
        p->data = malloc((size_t)n);
        if (!p->data) die("malloc");
        memcpy(p->data, buf, (size_t)n);
        p->len = (uint32_t)n;
        p->due = d->last_departure + delay_ns;
        d->tail++;
    }
}

/* Deliver every packet whose time has come; the earliest due time left (0: none). */
static uint64_t release(struct dir *d, uint64_t now) {
    while (d->head != d->tail) {
        struct pkt *p = &d->ring[d->head % SLOTS];
        if (p->due > now) return p->due;
        if (write(d->out_fd, p->data, p->len) < 0)
            d->write_errors++;
        else {
            d->pkts_out++;
            d->bytes_out += p->len;
        }
        free(p->data);
        d->head++;
    }
    return 0;
}

static void dir_json(FILE *f, const struct dir *d) {
    fprintf(f,
            "\"%s\": {\"pkts_in\": %llu, \"bytes_in\": %llu, \"pkts_out\": %llu, \"bytes_out\": %llu, "
            "\"drop_loss\": %llu, \"drop_queue\": %llu, \"drop_slots\": %llu, \"write_errors\": %llu, "
            "\"max_backlog\": %llu, \"queued\": %u}",
            d->name, (unsigned long long)d->pkts_in, (unsigned long long)d->bytes_in,
            (unsigned long long)d->pkts_out, (unsigned long long)d->bytes_out,
            (unsigned long long)d->drop_loss, (unsigned long long)d->drop_queue,
            (unsigned long long)d->drop_slots, (unsigned long long)d->write_errors,
            (unsigned long long)d->max_backlog, d->tail - d->head);
}

static void write_stats(const char *path, const struct dir *ab, const struct dir *ba) {
    if (!path) return;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fprintf(f, "{\"rate_mbit\": %.3f, \"delay_ms\": %.3f, \"loss\": %g, \"queue_bytes\": %llu, ",
            rate_bps / 1e6, (double)delay_ns / 1e6, loss, (unsigned long long)queue_bytes);
    dir_json(f, ab);
    fputs(", ", f);
    dir_json(f, ba);
    fputs("}\n", f);
    if (fclose(f) == 0) rename(tmp, path);
}

int main(int argc, char **argv) {
    const char *ns_a = NULL, *ns_b = NULL, *dev_a = NULL, *dev_b = NULL, *stats = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--ns-a")) ns_a = v;
        else if (!strcmp(k, "--ns-b")) ns_b = v;
        else if (!strcmp(k, "--dev-a")) dev_a = v;
        else if (!strcmp(k, "--dev-b")) dev_b = v;
        else if (!strcmp(k, "--stats")) stats = v;
        else if (!strcmp(k, "--rate-mbit")) rate_bps = atof(v) * 1e6;
        else if (!strcmp(k, "--delay-ms")) delay_ns = (uint64_t)(atof(v) * 1e6);
        else if (!strcmp(k, "--loss")) loss = atof(v);
        else if (!strcmp(k, "--queue-bytes")) queue_bytes = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--seed")) rng = strtoull(v, NULL, 10) | 1;
        else if (!strcmp(k, "--mtu")) mtu = strtoul(v, NULL, 10);
        else {
            fprintf(stderr, "linkemu: unknown option %s\n", k);
            return 2;
        }
    }
    if (!ns_a || !ns_b || !dev_a || !dev_b || rate_bps <= 0 || loss < 0 || loss >= 1) {
        fprintf(stderr, "linkemu: need --ns-a --dev-a --ns-b --dev-b, rate > 0, 0 <= loss < 1\n");
        return 2;
    }
    if (queue_bytes == 0) /* one bandwidth-delay product of buffer at the bottleneck */
        queue_bytes = (uint64_t)(rate_bps / 8 * 2 * (double)delay_ns / 1e9);
    if (queue_bytes < 4 * mtu) queue_bytes = 4 * mtu;
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); /* release packets on time, not 50 us late */

    struct dir ab = {.name = "a_to_b"}, ba = {.name = "b_to_a"};
    ab.in_fd = ba.out_fd = open_tun(ns_a, dev_a);
    ab.out_fd = ba.in_fd = open_tun(ns_b, dev_b);
    ab.ring = calloc(SLOTS, sizeof(struct pkt));
    ba.ring = calloc(SLOTS, sizeof(struct pkt));
    if (!ab.ring || !ba.ring) die("calloc");

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (sfd < 0 || tfd < 0 || ep < 0) die("signalfd/timerfd/epoll");
    int fds[4] = {ab.in_fd, ba.in_fd, tfd, sfd};
    for (int i = 0; i < 4; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0) die("epoll_ctl");
    }
    printf("ready\n");
    fflush(stdout);

    uint64_t next_stats = now_ns();
    uint64_t armed = 0;
    for (;;) {
        struct epoll_event evs[4];
        int n = epoll_wait(ep, evs, 4, 200);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ab.in_fd) take(&ab);
            else if (fd == ba.in_fd) take(&ba);
            else if (fd == tfd) {
                uint64_t x;
                (void)!read(tfd, &x, sizeof x);
                armed = 0;
            } else if (fd == sfd) {
                write_stats(stats, &ab, &ba);
                return 0;
            }
        }
        uint64_t now = now_ns();
        uint64_t a = release(&ab, now), b = release(&ba, now);
        uint64_t next = a && b ? (a < b ? a : b) : (a ? a : b);
        if (next && next != armed) {
            struct itimerspec its = {.it_value = {.tv_sec = (time_t)(next / 1000000000ull),
                                                  .tv_nsec = (long)(next % 1000000000ull)}};
            if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0) die("timerfd_settime");
            armed = next;
        }
        if (now >= next_stats) {
            write_stats(stats, &ab, &ba);
            next_stats = now + 200000000ull;
        }
    }
}
