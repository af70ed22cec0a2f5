module github.com/loopkit/loopkit/pkg/loopdev

go 1.26.6

require golang.org/x/sys v0.50.0
