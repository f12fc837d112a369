module ragtune.io/hack/kind/pause

go 1.24
