// Buckets: cutting a rank's send and receive segments into messages of at most bucket_bytes
// per peer and bucket, and laying out each bucket's staging area. Both sides of a pair cut
// the same ordered segment list with the same limit, so their messages match without talking.
#pragma once

#include <cstdint>
#include <vector>

#include "plan/types.h"

namespace refit {

// Cuts one peer's ordered segments `in` (all with the same peer) into messages of at most
// `limit` bytes, appending the pieces to `out` and one message per bucket used to `messages`
// (offset 0: bucket_side places them). Segments are split between rows, and rows longer than
// a whole message within the row. The staging side of each piece (`staged_src`: the source
// for receives, else the destination for sends) is packed contiguously from offset 0 of its
// message.
void cut_into_buckets(const std::vector<Segment>& in, int64_t limit, bool staged_src,
                      std::vector<Segment>& out, std::vector<Message>& messages);

// Groups `segs` by peer (stable), cuts each peer's run into buckets, then orders everything by
// (bucket, peer) and gives each message its offset in its bucket's staging area. Replaces
// `segs` and `messages`; `staging` gets each bucket's staging bytes.
void bucket_side(std::vector<Segment>& segs, std::vector<Message>& messages,
                 std::vector<int64_t>& staging, int64_t limit, bool staged_src);

// Buckets both directions of `plan` (its send and recv lists as the transfers left them) and
// sets num_buckets.
void assign_buckets(RankPlan& plan, int64_t bucket_bytes);

}  // namespace refit
