#define _GNU_SOURCE
/* A tiny epoll HTTP responder for the probe-engine benchmark: accepts on 0.0.0.0:PORT (inside
 * a namespace whose AnyIP route makes a whole range local, so one listener answers for every
 * address), answers the first read with a fixed 200 response and closes. A TCP connect probe
 * that resets at once is simply closed. Written in C so the responder is never the bottleneck
 * the benchmark measures. Usage: responder PORT */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static const char RESPONSE[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
    "Connection: close\r\n\r\nok\n";

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 65535)) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener};
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
    printf("ready\n");
    fflush(stdout);
    struct epoll_event events[512];
    char buf[4096];
    for (;;) {
        int n = epoll_wait(ep, events, 512, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                for (;;) {
                    int conn = accept4(listener, NULL, NULL, SOCK_NONBLOCK);
                    if (conn < 0) break;
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = conn};
                    epoll_ctl(ep, EPOLL_CTL_ADD, conn, &cev);
                }
                continue;
            }
            ssize_t got = read(fd, buf, sizeof buf);
            if (got < 0 && errno == EAGAIN) continue;
            if (got > 0) {
                ssize_t ignored = write(fd, RESPONSE, sizeof RESPONSE - 1);
                (void)ignored;
            }
            close(fd); /* closing removes it from the epoll set */
        }
    }
}
