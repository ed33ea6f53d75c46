// See ../../README.md: names only, for c10d's ProcessGroupGloo.hpp.
#pragma once
