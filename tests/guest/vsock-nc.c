/* vsock-nc: a small AF_VSOCK netcat for the nested tests (busybox nc has no vsock).
 * Built static by the nested harness and copied into the L2 initramfs.
 *
 *   vsock-nc CID PORT             connect; stdin -> socket (then shut down), socket -> stdout
 *   vsock-nc -l PORT              accept one connection; the same relay
 *   vsock-nc -l PORT -i           accept one connection and never read from it
 *   vsock-nc -p COUNT CID PORT    COUNT connections one after another, each sending
 *                                 "ping N\n" and expecting it echoed; prints PINGS_OK=N
 *   vsock-nc -t IPV4 PORT         the relay over TCP instead (the same code path, for
 *                                 benchmarks that compare vsock with a TCP stream)
 *
 * Listening modes print "vsock-nc: listening on PORT" to stderr once the socket listens.
 * Exit status: 0 on success, 1 on any error (with a message on stderr).
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <linux/vm_sockets.h>

static int fail(const char *what)
{
	fprintf(stderr, "vsock-nc: %s: %s\n", what, strerror(errno));
	return 1;
}

static unsigned parse_u32(const char *s)
{
	char *end;
	unsigned long v = strtoul(s, &end, 10);
	if (*s == '\0' || *end != '\0' || v > 0xffffffffUL) {
		fprintf(stderr, "vsock-nc: not a number: %s\n", s);
		exit(1);
	}
	return (unsigned)v;
}

static struct sockaddr_vm addr(unsigned cid, unsigned port)
{
	struct sockaddr_vm a;
	memset(&a, 0, sizeof(a));
	a.svm_family = AF_VSOCK;
	a.svm_cid = cid;
	a.svm_port = port;
	return a;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* Copies stdin to s and s to stdout until s reaches end of file. */
static int relay(int s)
{
	static char buf[65536];
	struct pollfd p[2] = { { .fd = s, .events = POLLIN }, { .fd = 0, .events = POLLIN } };
	int nfds = 2;
	for (;;) {
		if (poll(p, nfds, -1) < 0) {
			if (errno == EINTR)
				continue;
			return fail("poll");
		}
		if (p[0].revents) {
			ssize_t n = read(s, buf, sizeof(buf));
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0)
				return fail("read from the socket");
			if (n == 0)
				return 0;
			if (write_all(1, buf, (size_t)n) < 0)
				return fail("write to stdout");
		}
		if (nfds == 2 && p[1].revents) {
			ssize_t n = read(0, buf, sizeof(buf));
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0)
				return fail("read from stdin");
			if (n == 0) {
				shutdown(s, SHUT_WR);
				nfds = 1;
			} else if (write_all(s, buf, (size_t)n) < 0) {
				return fail("write to the socket");
			}
		}
	}
}

static int connect_to(unsigned cid, unsigned port)
{
	struct sockaddr_vm a = addr(cid, port);
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0)
		return -1;
	if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
		close(s);
		return -1;
	}
	return s;
}

static int listen_on(unsigned port, int idle)
{
	struct sockaddr_vm a = addr(VMADDR_CID_ANY, port);
	int l = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (l < 0)
		return fail("socket");
	if (bind(l, (struct sockaddr *)&a, sizeof(a)) < 0)
		return fail("bind");
	if (listen(l, 16) < 0)
		return fail("listen");
	fprintf(stderr, "vsock-nc: listening on %u\n", port);
	int s = accept(l, NULL, NULL);
	if (s < 0)
		return fail("accept");
	close(l);
	if (idle) {
		for (;;)
			pause();
	}
	return relay(s);
}

static int pings(unsigned count, unsigned cid, unsigned port)
{
	unsigned ok = 0;
	for (unsigned i = 0; i < count; i++) {
		char msg[32], got[64];
		int len = snprintf(msg, sizeof(msg), "ping %u\n", i);
		int s = connect_to(cid, port);
		if (s < 0)
			return fail("connect");
		if (write_all(s, msg, (size_t)len) < 0)
			return fail("write");
		shutdown(s, SHUT_WR);
		size_t have = 0;
		for (;;) {
			ssize_t n = read(s, got + have, sizeof(got) - 1 - have);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				break;
			have += (size_t)n;
			if (have == sizeof(got) - 1)
				break;
		}
		close(s);
		if (have == (size_t)len && memcmp(got, msg, (size_t)len) == 0)
			ok++;
		else
			fprintf(stderr, "vsock-nc: connection %u: wrong echo (%zu bytes)\n", i, have);
	}
	printf("PINGS_OK=%u\n", ok);
	return ok == count ? 0 : 1;
}

static int tcp_relay(const char *ip, unsigned port)
{
	struct sockaddr_in a;
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons((unsigned short)port);
	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
		fprintf(stderr, "vsock-nc: not an IPv4 address: %s\n", ip);
		return 1;
	}
	int s = socket(AF_INET, SOCK_STREAM, 0);
	if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof(a)) < 0)
		return fail("connect");
	return relay(s);
}

int main(int argc, char **argv)
{
	if (argc == 4 && strcmp(argv[1], "-t") == 0)
		return tcp_relay(argv[2], parse_u32(argv[3]));
	if (argc >= 3 && strcmp(argv[1], "-l") == 0)
		return listen_on(parse_u32(argv[2]), argc == 4 && strcmp(argv[3], "-i") == 0);
	if (argc == 5 && strcmp(argv[1], "-p") == 0)
		return pings(parse_u32(argv[2]), parse_u32(argv[3]), parse_u32(argv[4]));
	if (argc == 3) {
		int s = connect_to(parse_u32(argv[1]), parse_u32(argv[2]));
		if (s < 0)
			return fail("connect");
		return relay(s);
	}
	fprintf(stderr, "usage: vsock-nc CID PORT | -l PORT [-i] | -p COUNT CID PORT | -t IPV4 PORT\n");
	return 1;
}
